"""The one exception hierarchy of Blindfold, shared by the SDK, the server and the CLI.

Every message says what was expected, what was found, and what to do. No message ever
contains tensor contents, model bytes or tokens.
"""

from __future__ import annotations


class BlindfoldError(Exception):
    """Base class of every error Blindfold raises on purpose."""


# --- attestation: the server could not prove it is the expected code in a genuine TEE ---


class AttestationError(BlindfoldError):
    """The server's attestation was not accepted; no payload was sent."""


class EvidenceError(AttestationError):
    """The evidence is malformed, badly signed, does not chain to the vendor root, or its
    collateral is outside its validity window."""


class PolicyError(AttestationError):
    """The evidence is genuine but what it reports is not what the policy accepts."""

    def __init__(self, field: str, expected: object, found: object, advice: str = "") -> None:
        self.field = field
        self.expected = expected
        self.found = found
        message = f"{field}: expected {expected}, found {found}"
        if advice:
            message += f". {advice}"
        super().__init__(message)


class MeasurementMismatch(PolicyError):
    """A measurement (MRENCLAVE, MRTD, SNP MEASUREMENT, PCR, simulation digest) differs."""


class TeeKindNotAllowed(PolicyError):
    """The server runs in a TEE kind the policy does not list."""


class SimulationNotAllowed(AttestationError):
    """The server offers simulation evidence, which proves nothing, and the caller did not
    opt in with allow_simulation=True."""


class ReportDataMismatch(AttestationError):
    """The evidence does not bind the certificate the server presents (or not the nonce the
    client sent): someone may be relaying another server's evidence."""


class PinnedKeyMismatch(AttestationError):
    """A TLS connection presented a public key other than the attested one."""


class DeploymentChanged(AttestationError):
    """The server's key changed and the new evidence does not prove the same deployment (the
    same operator endorsement, SNP host_data, TDX mr_config_id or simulation deployment id)
    as the one the client attested: it may be another instance of the same code, reached by
    re-routing. Nothing was sent to it. `previous` and `current` describe both servers."""

    def __init__(self, message: str, *, previous: object = None, current: object = None) -> None:
        self.previous = previous
        self.current = current
        super().__init__(message)


# --- server: the server answered with an error ---


class ServerError(BlindfoldError):
    """The server answered with an HTTP error; `status` and the server's `message` are kept."""

    def __init__(self, status: int, message: str, *, method: str = "", path: str = "") -> None:
        self.status = status
        self.message = message
        where = f" for {method} {path}" if method else ""
        super().__init__(f"server answered {status}{where}: {message}")


class NotFoundError(ServerError):
    """The model (or version, or hash) does not exist on the server."""


class AuthenticationError(ServerError):
    """The server refused the request's token (401) or the token lacks the right (403)."""


# --- local problems ---


class InputError(BlindfoldError, ValueError):
    """The caller's inputs cannot be encoded for this model (wrong name, dtype, shape...)."""


class ConfigurationError(BlindfoldError, ValueError):
    """A policy file, command-line flag or server setting is invalid."""


class SealError(BlindfoldError):
    """Sealed data does not authenticate (wrong key, wrong label, modified, truncated,
    reordered) or is not in the sealed format. Messages name the label, never plaintext."""


class ReceiptError(BlindfoldError):
    """An inference receipt does not verify."""


def server_error(status: int, message: str, *, method: str = "", path: str = "") -> ServerError:
    """Builds the most specific ServerError subclass for an HTTP status."""
    cls: type[ServerError] = ServerError
    if status == 404:
        cls = NotFoundError
    elif status in (401, 403):
        cls = AuthenticationError
    return cls(status, message, method=method, path=path)


class SimulationWarning(UserWarning):
    """Warned whenever a client accepts simulation evidence (it was allowed to): no TEE
    protects the data. Filter it by class, e.g.
    `warnings.filterwarnings("ignore", category=blindfold.SimulationWarning)`."""


class RequestRejected(BlindfoldError):
    """Server side: the server refuses a request; rendered as `{"error": message}` with
    `status`. The SDK turns the answer back into a ServerError."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.message = message
        self.headers = headers or {}  # e.g. Retry-After with a 503
        super().__init__(message)
