"""Which *deployment* a server belongs to, beyond which *code* it runs.

A policy's measurements name the code; every genuine instance of the same build passes them.
To stay with the instance it attested after the server's key changes (a restart makes a new
TLS key), a client also needs to know that the new key belongs to the same deployment.
Evidence can say so in three ways:

- **an operator endorsement**: the operator keeps an Ed25519 or ECDSA P-256 key offline and,
  after attesting a freshly started server, signs `(deployment name, SHA-256 of the server's
  TLS public key)` and posts it to the server (`blindfold deployment endorse`), which then
  publishes it beside its evidence. Only the key holder can make one, and it binds exactly
  the key the evidence binds, so it cannot be copied to another instance;
- **a launch-time hardware field**: SEV-SNP `host_data`, TDX `mr_config_id`, or the
  simulation TEE's `deployment_id` (`blindfold serve --deployment-id`). Whoever launches a
  VM chooses these, so another party launching the same image can copy them: they separate
  an operator's deployments from each other, not from an attacker's copy.

A policy's `[deployment]` section pins them (`DeploymentPolicy`, composed of small rules with
one `verify()` like `attestation.policy`). Whatever the policy says, the client compares the
`DeploymentIdentity` of the new evidence with the one it attested first (`same_deployment`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from blindfold.attestation.kinds import KINDS
from blindfold.attestation.verdict import Verdict
from blindfold.errors import ConfigurationError, EvidenceError, PolicyError

FORMAT = "blindfold-deployment-endorsement/1"
MAX_NAME = 128

OperatorPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
OperatorPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

# The launch-time field that names the deployment, per TEE kind (`TeeKind.launch_field`).
HARDWARE_FIELDS = {kind.name: kind.launch_field for kind in KINDS if kind.launch_field}


# --- operator keys ---


def operator_key_id(public_key: OperatorPublicKey) -> str:
    """`sha256:<hex>` of the key's DER SubjectPublicKeyInfo: how policies name operators."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _checked_public(key: Any, where: str) -> OperatorPublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigurationError(f"{where}: operator keys must be Ed25519 or ECDSA P-256")


def load_operator_private_key(path: Path) -> OperatorPrivateKey:
    """An unencrypted PEM (PKCS#8) Ed25519 or P-256 private key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigurationError(f"cannot read operator key {path}: {exc.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(
            f"{path} is not an unencrypted PEM private key (make one with "
            "`blindfold deployment keygen`)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{path}: operator keys must be Ed25519 or ECDSA P-256")
    _checked_public(key.public_key(), str(path))
    return key


def load_operator_public_key(data: bytes, where: str) -> OperatorPublicKey:
    """A PEM public key (or the public half of a PEM private key's file is refused)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(f"{where} is not a PEM public key") from None
    return _checked_public(key, where)


def generate_operator_key() -> tuple[bytes, bytes, str]:
    """A new Ed25519 operator key: (private PEM, public PEM, key id)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem, operator_key_id(key.public_key())


# --- endorsements ---


def _message(deployment: str, spki_sha256: bytes, issued_at: int) -> bytes:
    body = {
        "format": FORMAT,
        "deployment": deployment,
        "spki_sha256": spki_sha256.hex(),
        "issued_at": issued_at,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def check_deployment_name(name: str) -> None:
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise ConfigurationError(
            f"a deployment name must be 1-{MAX_NAME} printable characters, e.g. 'prod-eu'"
        )


@dataclass(frozen=True)
class Endorsement:
    """An operator's signature saying: the TLS key hashing to `spki_sha256` is `deployment`."""

    deployment: str
    spki_sha256: bytes
    issued_at: int
    operator_key: OperatorPublicKey
    signature: bytes

    @classmethod
    def sign(
        cls,
        private_key: OperatorPrivateKey,
        deployment: str,
        spki_sha256: bytes,
        issued_at: int | None = None,
    ) -> Endorsement:
        check_deployment_name(deployment)
        issued_at = int(time.time()) if issued_at is None else issued_at
        message = _message(deployment, spki_sha256, issued_at)
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            signature = private_key.sign(message)
        else:
            signature = private_key.sign(message, ec.ECDSA(hashes.SHA256()))
        return cls(deployment, spki_sha256, issued_at, private_key.public_key(), signature)

    @property
    def operator_key_id(self) -> str:
        return operator_key_id(self.operator_key)

    def verify(self, spki_sha256: bytes) -> None:
        """The signature holds and the endorsement names exactly this server key."""
        if self.spki_sha256 != spki_sha256:
            raise EvidenceError(
                f"the deployment endorsement names TLS key {self.spki_sha256.hex()}, but the "
                f"evidence binds {spki_sha256.hex()}: it was copied from another server"
            )
        message = _message(self.deployment, self.spki_sha256, self.issued_at)
        try:
            if isinstance(self.operator_key, ed25519.Ed25519PublicKey):
                self.operator_key.verify(self.signature, message)
            else:
                self.operator_key.verify(self.signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise EvidenceError(
                "the deployment endorsement's signature does not verify: it was altered"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "deployment": self.deployment,
            "spki_sha256": self.spki_sha256.hex(),
            "issued_at": self.issued_at,
            "operator_key": base64.b64encode(
                self.operator_key.public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ).decode(),
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Endorsement:
        """Parses (does not verify) an endorsement; raises EvidenceError when malformed."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            deployment = data["deployment"]
            issued_at = data["issued_at"]
            if not isinstance(deployment, str) or not isinstance(issued_at, int):
                raise TypeError("deployment must be a string and issued_at an integer")
            check_deployment_name(deployment)
            spki = bytes.fromhex(data["spki_sha256"])
            if len(spki) != 32:
                raise ValueError("spki_sha256 must be 32 bytes")
            key = serialization.load_der_public_key(
                base64.b64decode(data["operator_key"], validate=True)
            )
            signature = base64.b64decode(data["signature"], validate=True)
            return cls(deployment, spki, issued_at, _checked_public(key, "operator_key"), signature)
        except (
            AttributeError,
            KeyError,
            TypeError,
            ValueError,
            UnsupportedAlgorithm,
            ConfigurationError,
        ) as exc:
            raise EvidenceError(
                f"the deployment endorsement is malformed ({exc}); expected {FORMAT} JSON "
                "with deployment, spki_sha256, issued_at, operator_key and signature"
            ) from None


# --- what the evidence says about the deployment ---


@dataclass(frozen=True)
class DeploymentIdentity:
    """The deployment a verified server belongs to, as far as its evidence can tell.

    `hardware` is (field name, value) of the launch-time field when it is set (not all
    zero, not empty); `operator` is (operator key id, deployment name) of a verified
    endorsement. An identity with neither cannot be told apart from any other instance.
    """

    hardware: tuple[str, str] | None = None
    operator: tuple[str, str] | None = None

    @property
    def known(self) -> bool:
        return self.hardware is not None or self.operator is not None

    def describe(self) -> str:
        parts = []
        if self.operator is not None:
            parts.append(f"deployment {self.operator[1]!r} endorsed by operator {self.operator[0]}")
        if self.hardware is not None:
            parts.append(f"{self.hardware[0]} {self.hardware[1]}")
        return "; ".join(parts) or "no deployment identity (not endorsed, no launch-time field)"


def identify(verdict: Verdict, endorsement: Endorsement | None) -> DeploymentIdentity:
    """The identity of a verified verdict; `endorsement` must already be verified."""
    hardware = None
    field = HARDWARE_FIELDS.get(verdict.kind)
    if field is not None:
        value = str(verdict.measurements.get(field) or "")
        if value.strip("0"):
            hardware = (field, value.lower() if field != "deployment_id" else value)
    operator = None
    if endorsement is not None:
        operator = (endorsement.operator_key_id, endorsement.deployment)
    return DeploymentIdentity(hardware, operator)


# --- the [deployment] policy section ---


class DeploymentRule(Protocol):
    @property
    def kinds(self) -> tuple[str, ...] | None:
        """The TEE kinds the rule applies to; None: every kind."""
        ...

    def verify(self, verdict: Verdict, endorsement: Endorsement | None) -> None: ...


@dataclass(frozen=True)
class EndorsedBy:
    """A verified endorsement by one of `key_ids`, for one of `names` (any name if empty)."""

    key_ids: tuple[str, ...]
    names: tuple[str, ...] = ()
    kinds: tuple[str, ...] | None = None

    def verify(self, verdict: Verdict, endorsement: Endorsement | None) -> None:
        if endorsement is None:
            raise PolicyError(
                "deployment operator endorsement",
                f"an endorsement by {' or '.join(self.key_ids)}",
                "none",
                "The operator has not endorsed this server's key yet: after it starts, the "
                "operator runs `blindfold deployment endorse URL --operator-key KEY --name N`.",
            )
        if endorsement.operator_key_id not in self.key_ids:
            raise PolicyError(
                "deployment operator key",
                " or ".join(self.key_ids),
                endorsement.operator_key_id,
                "Another operator endorsed this server: it is not your deployment.",
            )
        if self.names and endorsement.deployment not in self.names:
            raise PolicyError("deployment name", " or ".join(self.names), endorsement.deployment)


@dataclass(frozen=True)
class LaunchFieldIn:
    """The launch-time field of one TEE kind (`HARDWARE_FIELDS`) is one of `accepted`."""

    kind: str
    accepted: tuple[str, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,)

    def verify(self, verdict: Verdict, endorsement: Endorsement | None) -> None:
        field = HARDWARE_FIELDS[self.kind]
        found = str(verdict.measurements.get(field, "<absent>"))
        normalize = str if self.kind == "simulation" else str.lower
        if normalize(found) not in {normalize(value) for value in self.accepted}:
            raise PolicyError(
                f"{self.kind} {field} (deployment)",
                self.accepted[0] if len(self.accepted) == 1 else f"one of {self.accepted}",
                found,
                "The server belongs to another deployment of the same code.",
            )


_POLICY_KEYS = {
    "operator_keys": "operator key ids (sha256:<hex>) or PEM public keys",
    "names": "deployment names an endorsement may carry",
    "host_data": "SEV-SNP host_data values (hex)",
    "mr_config_id": "TDX mr_config_id values (hex)",
    "simulation_deployment_id": "simulation deployment ids (blindfold serve --deployment-id)",
}


@dataclass(frozen=True)
class DeploymentPolicy:
    """All rules that apply to the server's TEE kind must hold, and at least one must apply:
    a policy naming only SNP `host_data` refuses a TDX server rather than waving it through."""

    rules: Sequence[DeploymentRule]
    values: dict[str, list[str]]

    def verify(self, verdict: Verdict, endorsement: Endorsement | None) -> None:
        applicable = [r for r in self.rules if r.kinds is None or verdict.kind in r.kinds]
        if not applicable:
            raise PolicyError(
                "deployment",
                f"evidence naming a deployment the [deployment] section pins ({self.pinned()})",
                f"a {verdict.kind} server, for which the section pins nothing",
                "Add operator_keys, or the launch-time field of this TEE kind.",
            )
        for rule in applicable:
            rule.verify(verdict, endorsement)

    def pinned(self) -> str:
        return ", ".join(sorted(self.values))

    @classmethod
    def from_toml(cls, section: Any, source: str) -> DeploymentPolicy:
        if not isinstance(section, dict):
            raise ConfigurationError(f"{source}: [deployment] must be a table")
        unknown = set(section) - set(_POLICY_KEYS)
        if unknown:
            allowed = "; ".join(f"{k}: {v}" for k, v in _POLICY_KEYS.items())
            raise ConfigurationError(
                f"{source}: [deployment] has unknown keys {sorted(unknown)}; allowed: {allowed}"
            )
        values: dict[str, list[str]] = {}
        for key, item in section.items():
            items = [item] if isinstance(item, str) else item
            if (
                not isinstance(items, list)
                or not items
                or not all(isinstance(i, str) for i in items)
            ):
                raise ConfigurationError(
                    f"{source}: [deployment] {key} must be a string or a non-empty list of "
                    f"strings ({_POLICY_KEYS[key]})"
                )
            values[key] = items
        if "names" in values and "operator_keys" not in values:
            raise ConfigurationError(
                f"{source}: [deployment] names needs operator_keys (names are only "
                "believable inside an operator's signed endorsement)"
            )
        if not set(values) - {"names"}:
            raise ConfigurationError(
                f"{source}: [deployment] pins nothing; set operator_keys, host_data, "
                "mr_config_id or simulation_deployment_id"
            )
        rules: list[DeploymentRule] = []
        if "operator_keys" in values:
            values["operator_keys"] = [
                _key_id(k, f"{source}: [deployment] operator_keys") for k in values["operator_keys"]
            ]
            rules.append(EndorsedBy(tuple(values["operator_keys"]), tuple(values.get("names", ()))))
        for kind, key in (
            ("sev-snp", "host_data"),
            ("tdx", "mr_config_id"),
            ("simulation", "simulation_deployment_id"),
        ):
            if key in values:
                if kind != "simulation":
                    values[key] = [_hex(v, f"{source}: [deployment] {key}") for v in values[key]]
                rules.append(LaunchFieldIn(kind, tuple(values[key])))
        return cls(tuple(rules), values)


def _key_id(value: str, where: str) -> str:
    if value.startswith("-----BEGIN"):
        return operator_key_id(load_operator_public_key(value.encode(), where))
    digest = value.removeprefix("sha256:").lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigurationError(
            f"{where}: {value[:20]!r} is neither sha256:<64 hex> (`blindfold deployment "
            "keygen` prints it) nor a PEM public key"
        )
    return "sha256:" + digest


def _hex(value: str, where: str) -> str:
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ConfigurationError(f"{where}: {value!r} is not a hex string") from None
    if not value.strip("0"):
        raise ConfigurationError(
            f"{where}: all zeros is what a launch without the field reports; it names no "
            "deployment. Pin the value the operator sets at launch."
        )
    return value.lower()


# --- after a key change ---


def deployment_change(
    policy: DeploymentPolicy | None,
    previous: DeploymentIdentity,
    current: DeploymentIdentity,
    verdict: Verdict,
    endorsement: Endorsement | None,
) -> tuple[str, bool] | None:
    """None when the new evidence proves the deployment attested first; otherwise (why not,
    whether the caller may still accept it: False when the policy's pins refuse it)."""
    if policy is not None:
        try:
            policy.verify(verdict, endorsement)
        except PolicyError as exc:
            return f"the new server fails the policy's [deployment] pins ({exc})", False
    if previous.known and current == previous:
        return None
    if not previous.known:
        return (
            "the server attested first had no deployment identity (no operator endorsement, "
            "no launch-time field), so no new key can be shown to belong to it",
            True,
        )
    return f"it was {previous.describe()}; now it is {current.describe()}", True
