"""The interface every server-side TEE provider implements."""

from __future__ import annotations

from typing import Protocol

from blindfold.attestation.verdict import Evidence


class TeeProvider(Protocol):
    kind: str  # "simulation" | "sgx" | "tdx" | "sev-snp" | "nitro"

    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence whose 64-byte report data is `report_data`, with its collateral."""
        ...

    def collateral_valid_until(self) -> int | None:
        """Unix time at which the collateral shipped with the evidence expires (None: none)."""
        ...

    def sealing_key(self) -> bytes | None:
        """A 32-byte key only a TEE with the same measurement can derive (None: no such key)."""
        ...
