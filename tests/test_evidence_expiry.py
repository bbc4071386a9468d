"""Evidence that expires (DCAP collateral, Nitro certificates; here simulation evidence with a
short `--simulation-evidence-lifetime`) against a real server: the client attests again
before using its pin past the verdict's `valid_until`, and the server renews its standing
evidence so receipts keep naming evidence that verifies."""

from __future__ import annotations

import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

import blindfold
from blindfold.attestation.verdict import Evidence
from blindfold.attestation.verify import verify_evidence
from blindfold.client.attest import fetch_attestation
from blindfold.client.transport import Endpoint
from blindfold.errors import EvidenceError

from conftest import start_server
from onnx_models import add_mul_model

LIFETIME = 6


def _wait_past(deadline: int) -> None:
    while time.time() <= deadline + 1.2:  # verifiers compare whole seconds
        time.sleep(0.2)


def test_client_reattests_after_valid_until_and_receipts_name_fresh_evidence(
    tmp_path: Path,
) -> None:
    server = start_server(
        tmp_path, "--open-upload", "--simulation-evidence-lifetime", str(LIFETIME)
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = blindfold.connect(server.url, allow_simulation=True)
            with client:
                first = client.attestation
                assert first.verdict.valid_until is not None
                name = f"expiry-{uuid.uuid4().hex[:8]}"
                client.upload_model(add_mul_model(), name=name)
                x = np.ones((2, 4), np.float32)
                early = client.run_model(name, [x, x], receipt=True).receipt
                early_until = verify_evidence(early.evidence).valid_until
                assert early_until is not None

                _wait_past(max(early_until, first.verdict.valid_until))
                # The old evidence is now refused by any verifier ...
                with pytest.raises(EvidenceError, match="expired"):
                    verify_evidence(early.evidence)

                late = client.run_model(name, [x, x], receipt=True).receipt
                # ... so the client attested again before sending, and got a new window.
                assert client.attestation is not first
                renewed_until = client.attestation.verdict.valid_until
                assert renewed_until is not None and renewed_until > first.verdict.valid_until
                # The server renewed its standing evidence: the receipt names evidence that
                # verifies now, and still chains to the earlier receipt under the same key.
                assert late.receipt.evidence_sha256 != early.receipt.evidence_sha256
                assert verify_evidence(late.evidence).valid_until is not None
                assert late.receipt.sequence == early.receipt.sequence + 1

        # The nonce-less document anyone fetches is current too.
        document, _peer = fetch_attestation(Endpoint.parse(server.url), None)
        assert verify_evidence(Evidence.from_json(document)).valid_until is not None
    finally:
        server.stop()
