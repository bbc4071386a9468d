"""The one table from domain errors (`server.refusals`) to HTTP statuses, and the rendering
of a refusal as the `{"error": message}` answer every route gives. Nothing else in the server
chooses a status for a domain error."""

from __future__ import annotations

from blindfold.errors import RequestRejected
from blindfold.server.refusals import (
    AccessDenied,
    AuthenticationRequired,
    Conflict,
    InferenceTimeout,
    InvalidRequest,
    NotFound,
    OutOfMemory,
    PayloadTooLarge,
    Refusal,
    Unavailable,
    WorkerFailed,
)

# A subclass takes its nearest listed ancestor's status (InvalidModel -> InvalidRequest).
STATUS: dict[type[Refusal], int] = {
    InvalidRequest: 400,
    AuthenticationRequired: 401,
    AccessDenied: 403,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    WorkerFailed: 502,
    Unavailable: 503,
    InferenceTimeout: 504,
    OutOfMemory: 507,
}


def status_of(error: Refusal) -> int:
    """The HTTP status for a domain error: its class's entry, or its nearest ancestor's."""
    for cls in type(error).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    # Only the bare base class lands here: a refusal that names no reason is the server's bug.
    return 500


def rejection(error: Refusal | RequestRejected) -> RequestRejected:
    """The HTTP answer for a refusal (an HTTP-level refusal is already one)."""
    if isinstance(error, RequestRejected):
        return error
    return RequestRejected(status_of(error), error.message)
