"""SGX evidence from inside a Gramine enclave, through Gramine's /dev/attestation pseudo-files.

This module owns the Gramine side of SGX: checking that the enclave was built with
`sgx.remote_attestation = "dcap"`, binding 64 bytes of report data into a DCAP quote,
attaching Intel collateral for offline verification (via `pcs`), and deriving the server's
sealing key from Gramine's MRENCLAVE-bound SGX seal key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindfold.attestation.verdict import Evidence
from blindfold.server.tee.errors import TeeUnavailable
from blindfold.server.tee.pcs import (
    INTEL_PCS_URL,
    CollateralCache,
    Fetch,
    read_quote,
    urllib_fetch,
)

SEALING_INFO = b"blindfold sealing v1"


def derive_sealing_key(tee_key: bytes) -> bytes:
    """32 bytes for Blindfold from a TEE-derived key; the info string separates this use
    from any other use of the same hardware key."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEALING_INFO).derive(tee_key)


class GramineSgxProvider:
    """SGX DCAP quotes from Gramine's /dev/attestation, with Intel collateral attached."""

    kind = "sgx"

    def __init__(
        self,
        root: Path = Path("/dev/attestation"),
        pccs_url: str = INTEL_PCS_URL,
        cache_dir: Path | None = None,
        *,
        fetch: Fetch = urllib_fetch,
        refresh_margin: int = 86400,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self._check_dcap()
        self._collateral = CollateralCache(
            "sgx", pccs_url, fetch=fetch, cache_dir=cache_dir, refresh_margin=refresh_margin,
            now=now,
        )  # fmt: skip
        # Writing user_report_data then reading quote is a two-step protocol on shared
        # pseudo-files; two concurrent requests would get each other's quotes.
        self._lock = threading.Lock()

    def _check_dcap(self) -> None:
        type_file = self.root / "attestation_type"
        if not type_file.is_file():
            raise TeeUnavailable(
                f"{type_file} not found: the server is not running inside a Gramine SGX "
                "enclave. Start it with gramine-sgx (see deploy/README.md) or choose another "
                "--tee."
            )
        found = type_file.read_text().strip()
        if found != "dcap":
            raise TeeUnavailable(
                f"Gramine attestation type is {found!r}, expected 'dcap'; set "
                'sgx.remote_attestation = "dcap" in the manifest and re-sign the enclave'
            )

    def quote(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise ValueError(f"report data must be 64 bytes, got {len(report_data)}")
        with self._lock:
            (self.root / "user_report_data").write_bytes(report_data)
            quote = (self.root / "quote").read_bytes()
        if read_quote(quote, self.kind)[0].report_data != report_data:
            raise TeeUnavailable(
                f"the quote read from {self.root / 'quote'} does not carry the report data "
                "just written; another process inside the enclave may be using "
                "/dev/attestation concurrently"
            )
        return quote

    def evidence(self, report_data: bytes) -> Evidence:
        quote = self.quote(report_data)
        collateral = self._collateral.get(read_quote(quote, self.kind)[1])
        return Evidence(self.kind, quote, dict(collateral.files))

    def collateral_valid_until(self) -> int | None:
        return self._collateral.valid_until()

    def sealing_key(self) -> bytes | None:
        key_file = self.root / "keys" / "_sgx_mrenclave"
        try:
            key = key_file.read_bytes()
        except OSError as exc:
            raise TeeUnavailable(
                f"cannot read the SGX seal key at {key_file} ({exc.strerror}); Gramine >= 1.5 "
                "exposes it inside the enclave"
            ) from None
        if len(key) != 16:
            raise TeeUnavailable(f"{key_file} holds {len(key)} bytes, expected a 16-byte key")
        return derive_sealing_key(key)
