"""Attestation policy: which TEE kinds and which measured code a client accepts.

Modelled on sigstore-python's `verify/policy.py`: each rule is a small object with one
`verify(verdict)` method that raises a `PolicyError` naming the field, the expected and the
found value; rules compose with `AllOf` / `AnyOf`. `Policy` is the user-facing object: it
loads a TOML file with one section per accepted TEE kind and turns the section for the
verdict's kind into rules.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from blindfold.attestation.verdict import TEE_KINDS, Verdict
from blindfold.errors import (
    ConfigurationError,
    MeasurementMismatch,
    PolicyError,
    TeeKindNotAllowed,
)

if TYPE_CHECKING:
    from blindfold.attestation.deployment import DeploymentPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_UPDATE_ADVICE = "If the server was updated on purpose, update the policy's {field} after review."


class VerificationPolicy(Protocol):
    def verify(self, verdict: Verdict) -> None: ...


@dataclass(frozen=True)
class AllOf:
    policies: Sequence[VerificationPolicy]

    def verify(self, verdict: Verdict) -> None:
        for policy in self.policies:
            policy.verify(verdict)


@dataclass(frozen=True)
class AnyOf:
    policies: Sequence[VerificationPolicy]

    def verify(self, verdict: Verdict) -> None:
        failures: list[str] = []
        for policy in self.policies:
            try:
                policy.verify(verdict)
                return
            except PolicyError as exc:
                failures.append(str(exc))
        raise PolicyError("any of", "one rule to pass", "; ".join(failures) or "no rules")


@dataclass(frozen=True)
class KindIs:
    kinds: tuple[str, ...]

    def verify(self, verdict: Verdict) -> None:
        if verdict.kind not in self.kinds:
            raise TeeKindNotAllowed(
                "TEE kind",
                " or ".join(self.kinds),
                verdict.kind,
                f"Add a [{verdict.kind}] section to the policy if that TEE is trusted.",
            )


@dataclass(frozen=True)
class MeasurementIn:
    """A measurement must be one of the accepted values (hex compared case-insensitively)."""

    name: str
    accepted: tuple[str, ...]

    def verify(self, verdict: Verdict) -> None:
        found = str(verdict.measurements.get(self.name, "<absent>")).lower()
        if found not in {value.lower() for value in self.accepted}:
            expected = self.accepted[0] if len(self.accepted) == 1 else f"one of {self.accepted}"
            raise MeasurementMismatch(
                f"{verdict.kind} {self.name}",
                expected,
                found,
                _UPDATE_ADVICE.format(field=self.name),
            )


@dataclass(frozen=True)
class ValueEquals:
    name: str
    expected: int

    def verify(self, verdict: Verdict) -> None:
        found = verdict.measurements.get(self.name)
        if found != self.expected:
            raise PolicyError(f"{verdict.kind} {self.name}", self.expected, found)


@dataclass(frozen=True)
class AtLeast:
    name: str
    minimum: int

    def verify(self, verdict: Verdict) -> None:
        found = verdict.measurements.get(self.name)
        if not isinstance(found, int) or found < self.minimum:
            raise PolicyError(
                f"{verdict.kind} {self.name}",
                f">= {self.minimum}",
                found,
                "The platform or enclave runs an older security version than the policy allows.",
            )


@dataclass(frozen=True)
class TcbStatusIn:
    allowed: tuple[str, ...]

    def verify(self, verdict: Verdict) -> None:
        if verdict.tcb_status is None or verdict.tcb_status in self.allowed:
            return
        advisories = ", ".join(verdict.advisory_ids) or "none listed"
        raise PolicyError(
            f"{verdict.kind} TCB status",
            " or ".join(self.allowed),
            f"{verdict.tcb_status} (advisories: {advisories})",
            "Patch the platform, or after reviewing the advisories add the status by name to "
            f"allowed_tcb_status in the [{verdict.kind}] section.",
        )


@dataclass(frozen=True)
class NotDebug:
    def verify(self, verdict: Verdict) -> None:
        if verdict.debug:
            raise PolicyError(
                f"{verdict.kind} debug flag",
                "production (debug disabled)",
                "debug enabled: the host can read the TEE's memory",
                f"Only for development: set allow_debug = true in the [{verdict.kind}] section.",
            )


@dataclass(frozen=True)
class UnsafeAcceptAnyMeasurement:
    """Accepts every measurement. Only for tests: a server running any code passes."""

    def verify(self, verdict: Verdict) -> None:
        return None


# --- the TOML-backed policy ---

_HEX_LIST_KEYS: dict[str, tuple[str, ...]] = {
    "simulation": ("measurement",),
    "sgx": ("mr_enclave", "mr_signer"),
    "tdx": ("mr_td", "mr_seam", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner"),
    "sev-snp": ("measurement", "host_data"),
    "nitro": tuple(f"pcr{i}" for i in range(9)),
}
_REQUIRED_ONE_OF: dict[str, tuple[str, ...]] = {
    "simulation": ("measurement",),
    "sgx": ("mr_enclave", "mr_signer"),
    "tdx": ("mr_td",),
    "sev-snp": ("measurement",),
    "nitro": ("pcr0",),
}
_INT_EQUAL_KEYS = {"sgx": ("isv_prod_id",)}
_INT_MIN_KEYS = {
    "sgx": {"min_isv_svn": "isv_svn"},
    "sev-snp": {"min_guest_svn": "guest_svn"},
}
_SNP_TCB_PARTS = ("bootloader", "tee", "snp", "microcode")
_COMMON_KEYS = ("allowed_tcb_status", "allow_debug")


@dataclass(frozen=True)
class KindPolicy:
    """The accepted values for one TEE kind, as read from its TOML section."""

    kind: str
    values: dict[str, Any] = field(default_factory=dict)

    def rules(self) -> list[VerificationPolicy]:
        rules: list[VerificationPolicy] = [KindIs((self.kind,))]
        if self.values.get("unsafe_accept_any_measurement"):
            rules.append(UnsafeAcceptAnyMeasurement())
        for key in _HEX_LIST_KEYS[self.kind]:
            if key in self.values:
                rules.append(MeasurementIn(key, tuple(self.values[key])))
        for key in _INT_EQUAL_KEYS.get(self.kind, ()):
            if key in self.values:
                rules.append(ValueEquals(key, self.values[key]))
        for key, measured in _INT_MIN_KEYS.get(self.kind, {}).items():
            if key in self.values:
                rules.append(AtLeast(measured, self.values[key]))
        for part, minimum in self.values.get("min_tcb", {}).items():
            rules.append(AtLeast(f"reported_tcb_{part}", minimum))
        if self.kind != "simulation":
            rules.append(TcbStatusIn(tuple(self.values.get("allowed_tcb_status", ["UpToDate"]))))
            if not self.values.get("allow_debug", False):
                rules.append(NotDebug())
        return rules

    def verify(self, verdict: Verdict) -> None:
        AllOf(self.rules()).verify(verdict)


@dataclass(frozen=True)
class Policy:
    """The TEE kinds a client accepts and, per kind, the measured code it expects; and
    optionally (`[deployment]`, see `attestation.deployment`) which deployment of that code.
    `verify` checks the code; the client checks the deployment with the endorsement."""

    kinds: dict[str, KindPolicy]
    deployment: DeploymentPolicy | None = None

    def verify(self, verdict: Verdict) -> None:
        if verdict.kind not in self.kinds:
            KindIs(tuple(self.kinds)).verify(verdict)
        self.kinds[verdict.kind].verify(verdict)

    @classmethod
    def simulation(cls, measurement: str | None = None) -> Policy:
        """Accept the simulation TEE running exactly `measurement` (default: the code of the
        blindfold package installed here, which a local test server also runs)."""
        from blindfold.attestation.simulation import measure_package

        return cls.from_dict({"simulation": {"measurement": [measurement or measure_package()]}})

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "policy") -> Policy:
        from blindfold.attestation.deployment import DeploymentPolicy

        data = dict(data)
        deployment = data.pop("deployment", None)
        kinds = {}
        for kind, section in data.items():
            if kind not in TEE_KINDS:
                raise ConfigurationError(
                    f"{source}: unknown section [{kind}]; expected one of {', '.join(TEE_KINDS)}"
                )
            if not isinstance(section, dict):
                raise ConfigurationError(f"{source}: [{kind}] must be a table")
            kinds[kind] = KindPolicy(kind, _check_section(kind, section, source))
        if not kinds:
            raise ConfigurationError(f"{source}: the policy accepts no TEE kind; add a section")
        if deployment is None:
            return cls(kinds)
        return cls(kinds, DeploymentPolicy.from_toml(deployment, source))

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigurationError(f"cannot read policy file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"policy file {path} is not valid TOML: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def to_toml(self) -> str:
        sections = {kind: kp.values for kind, kp in self.kinds.items()}
        if self.deployment is not None:
            sections["deployment"] = dict(self.deployment.values)
        return dump_toml(sections)


def _check_section(kind: str, section: dict[str, Any], source: str) -> dict[str, Any]:
    allowed = set(_HEX_LIST_KEYS[kind]) | set(_INT_EQUAL_KEYS.get(kind, ()))
    allowed |= set(_INT_MIN_KEYS.get(kind, {})) | {"unsafe_accept_any_measurement"}
    if kind != "simulation":
        allowed |= set(_COMMON_KEYS)
    if kind == "sev-snp":
        allowed.add("min_tcb")
    unknown = set(section) - allowed
    if unknown:
        raise ConfigurationError(
            f"{source}: [{kind}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    values = dict(section)
    for key in _HEX_LIST_KEYS[kind]:
        if key in values:
            values[key] = _hex_list(values[key], f"{source}: [{kind}] {key}")
    for key in (*_INT_EQUAL_KEYS.get(kind, ()), *_INT_MIN_KEYS.get(kind, {})):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool)):
            raise ConfigurationError(f"{source}: [{kind}] {key} must be an integer")
    if "min_tcb" in values:
        tcb = values["min_tcb"]
        if not isinstance(tcb, dict) or set(tcb) - set(_SNP_TCB_PARTS):
            raise ConfigurationError(
                f"{source}: [sev-snp] min_tcb must be a table with keys {_SNP_TCB_PARTS}"
            )
    if "allowed_tcb_status" in values:
        statuses = values["allowed_tcb_status"]
        if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
            raise ConfigurationError(f"{source}: [{kind}] allowed_tcb_status must list names")
    if "allow_debug" in values and not isinstance(values["allow_debug"], bool):
        raise ConfigurationError(f"{source}: [{kind}] allow_debug must be true or false")
    if not values.get("unsafe_accept_any_measurement") and not any(
        key in values for key in _REQUIRED_ONE_OF[kind]
    ):
        raise ConfigurationError(
            f"{source}: [{kind}] pins no measurement; set one of {_REQUIRED_ONE_OF[kind]}"
        )
    return values


def _hex_list(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigurationError(f"{where} must be a hex string or a non-empty list of them")
    for item in items:
        try:
            bytes.fromhex(item)
        except (TypeError, ValueError):
            raise ConfigurationError(f"{where}: {item!r} is not a hex string") from None
    return [item.lower() for item in items]


def dump_toml(sections: dict[str, dict[str, Any]], header: Iterable[str] = ()) -> str:
    """Writes the small subset of TOML a policy uses (strings, ints, bools, lists, one level
    of inline tables) by hand: not worth a dependency."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int):
            return str(item)
        if isinstance(item, str):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{k} = {value(v)}" for k, v in item.items()) + " }"
        raise TypeError(f"cannot write {type(item).__name__} to TOML")

    lines = [f"# {line}" if line else "#" for line in header]
    for kind, section in sections.items():
        lines.append(f'\n["{kind}"]' if "-" in kind else f"\n[{kind}]")
        lines.extend(f"{key} = {value(item)}" for key, item in section.items())
    return "\n".join(lines).lstrip("\n") + "\n"
