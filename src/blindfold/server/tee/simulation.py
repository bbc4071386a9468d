"""The simulation TEE provider: software-signed evidence and an insecure sealing-key file.

It trusts everything and protects nothing; it lets the whole protocol run without hardware.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from blindfold.attestation.simulation import WARNING, SimulationSigner
from blindfold.attestation.verdict import Evidence

logger = logging.getLogger("blindfold.tee")
SEALING_KEY_FILE = "INSECURE-simulation-sealing.key"


class SimulationProvider:
    kind = "simulation"

    def __init__(
        self,
        state_dir: Path | None = None,
        evidence_lifetime: int | None = None,
        deployment_id: str = "",
        measurement: str | None = None,  # tests only: claim what other code would measure
    ) -> None:
        self._signer = SimulationSigner(
            measurement, lifetime=evidence_lifetime, deployment_id=deployment_id
        )
        self._state_dir = state_dir
        self.measurement = self._signer.measurement
        logger.warning("%s", WARNING)

    def evidence(self, report_data: bytes) -> Evidence:
        return Evidence("simulation", self._signer.evidence(report_data))

    def collateral_valid_until(self) -> int | None:
        # Evidence made now expires `lifetime` from now: what a fresh standing document gets.
        if self._signer.lifetime is None:
            return None
        return int(time.time()) + self._signer.lifetime

    def sealing_key(self) -> bytes | None:
        """A key kept in a plain file next to the store: anyone with the disk can read it."""
        if self._state_dir is None:
            return None
        path = self._state_dir / SEALING_KEY_FILE
        if not path.exists():
            self._state_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
            logger.warning("simulation sealing key created in %s: it is NOT protected", path)
        return path.read_bytes()
