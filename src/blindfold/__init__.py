"""Blindfold: confidential ONNX inference. The SDK verifies the server's TEE attestation
before any data leaves this machine.

    import blindfold
    with blindfold.connect("https://127.0.0.1:8443", allow_simulation=True) as client:
        model = client.upload_model("model.onnx")
        outputs = client.run_model(model.sha256, {"x": array})

Everything a caller names (the client, what it verified, policies, receipts, every error
and the simulation warning) is importable from here.
"""

# The one place the version is written: pyproject.toml reads it from here (setuptools'
# dynamic version), the server's metadata (GET /v2) and the OpenAPI document state it.
__version__ = "0.1.0"

from blindfold.attestation.kinds import VerifierOptions
from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.client.attest import AttestedServer
from blindfold.client.client import Client, Outputs, TransportFactory, UploadedModel, connect
from blindfold.client.transport import BaseTransport, HttpRequest, HttpResponse
from blindfold.errors import (
    AttestationError,
    AuthenticationError,
    BlindfoldError,
    ConfigurationError,
    DeploymentChanged,
    EvidenceError,
    InputError,
    MeasurementMismatch,
    NotFoundError,
    PinnedKeyMismatch,
    PolicyError,
    ReceiptError,
    ReportDataMismatch,
    SealError,
    ServerError,
    SimulationNotAllowed,
    SimulationWarning,
    TeeKindNotAllowed,
)
from blindfold.receipts import Receipt, SavedReceipt

__all__ = [
    "AttestationError",
    "AttestedServer",
    "AuthenticationError",
    "BaseTransport",
    "BlindfoldError",
    "Client",
    "ConfigurationError",
    "DeploymentChanged",
    "Evidence",
    "EvidenceError",
    "HttpRequest",
    "HttpResponse",
    "InputError",
    "MeasurementMismatch",
    "NotFoundError",
    "Outputs",
    "PinnedKeyMismatch",
    "Policy",
    "PolicyError",
    "Receipt",
    "ReceiptError",
    "ReportDataMismatch",
    "SavedReceipt",
    "SealError",
    "ServerError",
    "SimulationNotAllowed",
    "SimulationWarning",
    "TeeKindNotAllowed",
    "TransportFactory",
    "UploadedModel",
    "Verdict",
    "VerifierOptions",
    "connect",
]
