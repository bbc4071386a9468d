"""The server's domain errors: what the registry, the store, the runtime, the ONNX checker and
the model service raise when they refuse an operation. They name no HTTP status: the HTTP
layer (`server.http_errors`) maps each class to one, in one table.

Like every Blindfold error, a message says what was wrong and what to do, and never quotes
tensor contents, model bytes or tokens.
"""

from __future__ import annotations

from blindfold.errors import BlindfoldError


class Refusal(BlindfoldError):
    """Server side: the operation was refused; `message` is what the client is told."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class InvalidRequest(Refusal):
    """A parameter of the request is malformed or out of range (a name, an option, a nonce)."""


class InvalidInput(InvalidRequest):
    """The tensors sent do not fit the model (names, datatypes, shapes, values)."""


class InvalidModel(InvalidRequest):
    """The uploaded model is refused: not ONNX, unsafe, or onnxruntime cannot load it."""


class AuthenticationRequired(Refusal):
    """The operation needs a token and none (or a malformed one) was sent."""


class AccessDenied(Refusal):
    """The token sent does not grant this operation, or the server does not allow it."""


class NotFound(Refusal):
    """The thing named does not exist (or the caller may not learn that it does)."""


class ModelNotFound(NotFound):
    """No model the caller may use has this name, version or hash."""


class Conflict(Refusal):
    """The operation clashes with the server's current state (a concurrent change, a full
    registry, an endorsement already in place): retrying as it is may not help."""


class PayloadTooLarge(Refusal):
    """What was sent exceeds one of the server's configured limits."""


class Unavailable(Refusal):
    """The server cannot do this now (a worker stopped, the store cannot write); retry later."""


class ModelNotReady(Unavailable):
    """The model exists but cannot serve: stored but refused at start, with its reason."""


class WorkerFailed(Refusal):
    """The isolated worker process answered with something the server cannot accept."""


class InferenceTimeout(Refusal):
    """The inference ran longer than the server's limit."""


class OutOfMemory(Refusal):
    """The model, or the model on these inputs, needs more memory than the server allows."""
