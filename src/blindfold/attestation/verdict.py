"""What every TEE verifier consumes (Evidence) and produces (Verdict).

A verifier only checks that evidence is genuine: signatures, certificate chains to the
vendor root, collateral validity at the given time, TCB level selection. Whether what the
evidence reports is *acceptable* is the policy's job (`attestation.policy`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Evidence:
    """Evidence as the server publishes it at `GET /v2/attestation`.

    `collateral` maps file names (as laid out in a vector folder of the attestation store,
    e.g. ``collateral.dcap-qvl.json``, ``vcek.der``, ``ask_ark.pem``) to their bytes.
    """

    kind: str
    evidence: bytes
    collateral: dict[str, bytes] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "evidence": base64.b64encode(self.evidence).decode(),
            "collateral": {k: base64.b64encode(v).decode() for k, v in self.collateral.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evidence:
        from blindfold.errors import EvidenceError

        try:
            return cls(
                kind=str(data["kind"]),
                evidence=base64.b64decode(data["evidence"], validate=True),
                collateral={
                    str(k): base64.b64decode(v, validate=True)
                    for k, v in (data.get("collateral") or {}).items()
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EvidenceError(
                f"attestation evidence is malformed ({exc!r}); expected JSON with 'kind', "
                "base64 'evidence' and a 'collateral' object. Check that the URL points to a "
                "Blindfold server."
            ) from None


@dataclass(frozen=True)
class Verdict:
    """The verified claims of one piece of evidence.

    `measurements` holds the claims listed in the kind's `TeeKind.claims`
    (`attestation.kinds`): hex strings for byte fields, ints for numbers, and for SGX/TDX
    platform flags True / False / None where the PCK certificate does not say.
    `report_data` is the 64 bytes the TEE bound into the evidence (for Nitro: user_data).
    `valid_from` / `valid_until` bound the validity window of the collateral (unix seconds);
    a client attests again before relying on the verdict after `valid_until`.
    """

    kind: str
    measurements: dict[str, Any]
    report_data: bytes
    debug: bool = False
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    valid_from: int | None = None
    valid_until: int | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly view for printing (CLI, `client.attestation`)."""
        return {
            "kind": self.kind,
            "measurements": self.measurements,
            "report_data": self.report_data.hex(),
            "debug": self.debug,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "valid_from": self.valid_from,
            "valid_until": self.valid_until,
        }
