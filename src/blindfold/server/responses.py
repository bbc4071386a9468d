"""A response whose body goes out as the parts it was encoded in (the JSON header, then each
binary tensor's bytes), so a large output is never copied into one joined buffer first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

# Below this, one joined write costs less than a write (and a TLS record) per part.
JOIN_BELOW = 64 * 1024


def parts_response(
    parts: Sequence[bytes | memoryview], media_type: str, headers: Mapping[str, str] | None = None
) -> Response:
    total = sum(len(part) for part in parts)
    if total < JOIN_BELOW or len(parts) == 1:
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        return Response(bytes(body), media_type=media_type, headers=headers)
    return PartsResponse(parts, total, media_type, headers)


class PartsResponse(Response):
    def __init__(
        self,
        parts: Sequence[bytes | memoryview],
        total: int,
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.body = b""  # the body is `parts`; a declared length keeps this one out of it
        self.init_headers({**(headers or {}), "content-length": str(total)})
        self._parts = [part for part in parts if len(part)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self._parts) - 1
        for index, part in enumerate(self._parts):
            await send({"type": "http.response.body", "body": part, "more_body": index < last})
