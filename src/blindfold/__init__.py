"""Blindfold: confidential ONNX inference. The SDK verifies the server's TEE attestation
before any data leaves this machine.

    import blindfold
    with blindfold.connect("https://127.0.0.1:8443", allow_simulation=True) as client:
        model = client.upload_model("model.onnx")
        outputs = client.run_model(model.sha256, {"x": array})
"""

__version__ = "0.1.0"

from blindfold.attestation.policy import Policy
from blindfold.client.client import Client, Outputs, UploadedModel, connect
from blindfold.errors import (
    AttestationError,
    AuthenticationError,
    BlindfoldError,
    DeploymentChanged,
    EvidenceError,
    InputError,
    MeasurementMismatch,
    NotFoundError,
    PinnedKeyMismatch,
    PolicyError,
    ReportDataMismatch,
    ServerError,
    SimulationNotAllowed,
    SimulationWarning,
)

__all__ = [
    "AttestationError",
    "AuthenticationError",
    "BlindfoldError",
    "Client",
    "DeploymentChanged",
    "EvidenceError",
    "InputError",
    "MeasurementMismatch",
    "NotFoundError",
    "Outputs",
    "PinnedKeyMismatch",
    "Policy",
    "PolicyError",
    "ReportDataMismatch",
    "ServerError",
    "SimulationNotAllowed",
    "SimulationWarning",
    "UploadedModel",
    "connect",
]
