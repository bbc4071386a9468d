"""Attestation policy: which TEE kinds and which measured code a client accepts.

Modelled on sigstore-python's `verify/policy.py`: each rule is a small object with one
`verify(verdict)` method that raises a `PolicyError` naming the field, the expected and the
found value; rules compose with `AllOf` (never empty). `Policy` is the user-facing object: it
loads a TOML file with one section per accepted TEE kind and turns the section for the
verdict's kind into rules.

This module owns the policy *format*: per TEE kind, one `KindSpec` (`SGX_POLICY`, ...) lists
every key a section may hold (its type, its default, the rules it becomes) and what a
section must pin to be complete. Adding a key means adding one `Key` to one spec; adding a
kind means adding a spec here and a `TeeKind` in `attestation.kinds`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from blindfold.attestation.formats import snp
from blindfold.attestation.verdict import Verdict
from blindfold.errors import (
    ConfigurationError,
    MeasurementMismatch,
    PolicyError,
    TeeKindNotAllowed,
)

if TYPE_CHECKING:
    from blindfold.attestation.deployment import DeploymentPolicy

_UPDATE_ADVICE = "If the server was updated on purpose, update the policy's {field} after review."


class VerificationPolicy(Protocol):
    def verify(self, verdict: Verdict) -> None: ...


@dataclass(frozen=True)
class AllOf:
    """Every rule must pass. An empty list is refused: a policy with no rule would accept
    any evidence, and no caller means that."""

    policies: Sequence[VerificationPolicy]

    def __post_init__(self) -> None:
        # A tuple copy, so a caller's later changes to its list cannot empty the rules.
        object.__setattr__(self, "policies", tuple(self.policies))
        if not self.policies:
            raise ConfigurationError(
                "AllOf([]) has no rule and would accept any evidence; give at least one rule "
                "(UnsafeAcceptAnyMeasurement() says so explicitly, for tests)"
            )

    def verify(self, verdict: Verdict) -> None:
        for policy in self.policies:
            policy.verify(verdict)


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
    advice: str = ""

    def verify(self, verdict: Verdict) -> None:
        found = verdict.measurements.get(self.name)
        if found != self.expected:
            raise PolicyError(f"{verdict.kind} {self.name}", self.expected, found, self.advice)


@dataclass(frozen=True)
class MaskedEquals:
    """`found & mask == value & mask` on a hex field (TDX td_attributes, xfam): pins the bits
    the mask selects and leaves the others free."""

    name: str
    value: str
    mask: str

    def verify(self, verdict: Verdict) -> None:
        found_hex = str(verdict.measurements.get(self.name, ""))
        found = bytes.fromhex(found_hex) if _is_hex(found_hex) else b""
        value, mask = bytes.fromhex(self.value), bytes.fromhex(self.mask)
        if len(found) != len(mask) or any(
            (f & m) != (v & m) for f, v, m in zip(found, value, mask, strict=True)
        ):
            raise PolicyError(
                f"{verdict.kind} {self.name}",
                f"{self.value} under mask {self.mask}",
                found_hex or "<absent>",
                _UPDATE_ADVICE.format(field=self.name),
            )


@dataclass(frozen=True)
class PolicyBit:
    """One bit of an integer claim (the SEV-SNP guest policy) must be set or clear."""

    name: str
    bit: int
    must_be_set: bool
    meaning: str
    advice: str

    def verify(self, verdict: Verdict) -> None:
        found = verdict.measurements.get(self.name)
        if not isinstance(found, int) or bool(found >> self.bit & 1) != self.must_be_set:
            state = "set" if self.must_be_set else "clear"
            shown = f"{found:#x}" if isinstance(found, int) else found
            raise PolicyError(
                f"{verdict.kind} {self.name} bit {self.bit} ({self.meaning})",
                state,
                shown,
                self.advice,
            )


@dataclass(frozen=True)
class ClaimNotTrue:
    """A platform property the verifier reports (where the platform reports it at all) must
    not be true, e.g. a DCAP dynamic platform or SMT when the policy refuses them."""

    name: str
    advice: str

    def verify(self, verdict: Verdict) -> None:
        if verdict.measurements.get(self.name) is True:
            raise PolicyError(f"{verdict.kind} {self.name}", "false", "true", self.advice)


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


# --- the TOML format: one spec per TEE kind ---

_ABSENT: Any = object()


class _Invalid(ValueError):
    """A value does not have the key's type; the message says what was found."""


@dataclass(frozen=True)
class Key:
    """One key of a policy section: its type (`expected`, for messages), how a value is
    checked and normalised (`parse`), and the rules it becomes. With a `default`, the rules
    apply even when the key is absent (safe defaults)."""

    name: str
    expected: str
    parse: Callable[[Any], Any]
    rules: Callable[[Any], list[VerificationPolicy]]
    default: Any = _ABSENT


@dataclass(frozen=True)
class KindSpec:
    """Every key a `[kind]` section may hold, what it must pin to be complete, and the rules
    that apply whatever the section says.

    `incomplete(values)` returns None, or a sentence saying what is missing and what to add;
    it is skipped under `unsafe_accept_any_measurement`.
    """

    kind: str
    keys: tuple[Key, ...]
    incomplete: Callable[[dict[str, Any]], str | None]
    always: tuple[VerificationPolicy, ...] = ()

    def key(self, name: str) -> Key | None:
        return next((key for key in self.keys if key.name == name), None)


def _found(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:60]}"


def _is_hex(value: str) -> bool:
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def _parse_hex(nbytes: int) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not _is_hex(value):
            raise _Invalid(f"found {_found(value)}")
        if len(bytes.fromhex(value)) != nbytes:
            raise _Invalid(f"found {len(bytes.fromhex(value))} bytes")
        return value.lower()

    return parse


def _parse_hex_list(nbytes: int) -> Callable[[Any], list[str]]:
    one = _parse_hex(nbytes)

    def parse(value: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise _Invalid(f"found {_found(value)}")
        return [one(item) for item in items]

    return parse


def _parse_int(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        # bool is an int subclass in Python: `true` must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"found {_found(value)}")
        if not low <= value <= high:
            raise _Invalid(f"found {value}, outside {low}..{high}")
        return value

    return parse


def _parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"found {_found(value)}")
    return value


def _parse_names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Invalid(f"found {_found(value)}")
    return list(value)


def _parse_masked(nbytes: int) -> Callable[[Any], dict[str, str]]:
    exact = _parse_hex(nbytes)

    def parse(value: Any) -> dict[str, str]:
        if isinstance(value, str):
            return {"value": exact(value), "mask": "ff" * nbytes}
        if not isinstance(value, dict) or set(value) != {"value", "mask"}:
            raise _Invalid(f"found {_found(value)}")
        return {"value": exact(value["value"]), "mask": exact(value["mask"])}

    return parse


def _parse_table(parts: tuple[str, ...], part: Callable[[Any], int]) -> Callable[[Any], Any]:
    def parse(value: Any) -> dict[str, int]:
        if not isinstance(value, dict) or set(value) != set(parts):
            raise _Invalid(f"found {_found(value)}")
        return {name: part(value[name]) for name in parts}

    return parse


def _hex_pin(name: str, nbytes: int) -> Key:
    return Key(
        name,
        f"a {nbytes * 2}-hex-digit string or a non-empty list of them",
        _parse_hex_list(nbytes),
        lambda accepted: [MeasurementIn(name, tuple(accepted))],
    )


def _masked_pin(name: str, nbytes: int) -> Key:
    return Key(
        name,
        f'a {nbytes * 2}-hex-digit string, or a table {{ value = "<hex>", mask = "<hex>" }}',
        _parse_masked(nbytes),
        lambda pin: [MaskedEquals(name, pin["value"], pin["mask"])],
    )


def _minimum(name: str, measured: str, high: int) -> Key:
    return Key(
        name, f"an integer 0..{high}", _parse_int(0, high), lambda low: [AtLeast(measured, low)]
    )


def _unsafe_accept_any() -> Key:
    return Key(
        "unsafe_accept_any_measurement",
        "true or false",
        _parse_bool,
        lambda unsafe: [UnsafeAcceptAnyMeasurement()] if unsafe else [],
    )


def _hardware_common() -> tuple[Key, ...]:
    """TCB status and debug: the safe defaults every hardware kind shares."""
    return (
        Key(
            "allowed_tcb_status",
            'a list of status names, e.g. ["UpToDate"]',
            _parse_names,
            lambda allowed: [TcbStatusIn(tuple(allowed))],
            default=["UpToDate"],
        ),
        Key(
            "allow_debug",
            "true or false",
            _parse_bool,
            lambda allow: [] if allow else [NotDebug()],
            default=False,
        ),
    )


def _dcap_platform() -> tuple[Key, ...]:
    """dcap-qvl's quote-policy options that say something about the platform (SGX, TDX).

    dcap-qvl 0.7 also offers grace periods (accepting an OutOfDate TCB for a while after
    Intel's release; `allowed_tcb_status` covers that decision), advisory deny-lists
    (the verdict's advisory IDs are shown on every TCB failure) and accepted SGX types;
    those are not exposed. Dynamic platform, cached keys and SMT come from the PCK
    certificate's platform configuration, which only platforms with a platform CA carry;
    where it is absent the verifier reports None and these rules cannot refuse.
    """
    return (
        Key(
            "min_tcb_eval_data_number",
            "an integer >= 0",
            _parse_int(0, 2**32 - 1),
            lambda low: [AtLeast("tcb_eval_data_number", low)],
        ),
        Key(
            "allow_dynamic_platform",
            "true or false",
            _parse_bool,
            lambda allow: (
                []
                if allow
                else [ClaimNotTrue("dynamic_platform", "The platform may add CPU packages.")]
            ),
        ),
        Key(
            "allow_cached_keys",
            "true or false",
            _parse_bool,
            lambda allow: (
                []
                if allow
                else [ClaimNotTrue("cached_keys", "The platform caches its platform keys.")]
            ),
        ),
        Key(
            "allow_smt",
            "true or false",
            _parse_bool,
            lambda allow: (
                [] if allow else [ClaimNotTrue("smt_enabled", "The platform runs with SMT on.")]
            ),
        ),
    )


def _need(values: dict[str, Any], *keys: str) -> list[str]:
    return [key for key in keys if key not in values]


def _simulation_incomplete(values: dict[str, Any]) -> str | None:
    return "set measurement (from `blindfold measure`)" if "measurement" not in values else None


def _sgx_incomplete(values: dict[str, Any]) -> str | None:
    if "mr_enclave" in values:
        return None
    if "mr_signer" not in values:
        return "set mr_enclave (the exact enclave) or mr_signer with isv_prod_id and min_isv_svn"
    missing = _need(values, "isv_prod_id", "min_isv_svn")
    if missing:
        return (
            f"mr_signer alone accepts every enclave its key ever signed, old and vulnerable "
            f"ones included; add {' and '.join(missing)} (or pin mr_enclave)"
        )
    return None


TDX_RTMRS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3")


def _tdx_incomplete(values: dict[str, Any]) -> str | None:
    both = [r for r in TDX_RTMRS if r in values and values.get(f"unsafe_ignore_{r}")]
    if both:
        return f"{both[0]} is pinned and unsafe_ignore_{both[0]} = true: choose one"
    rtmrs = [r for r in TDX_RTMRS if r not in values and not values.get(f"unsafe_ignore_{r}")]
    if not rtmrs:
        return "add mr_td (the TD's virtual firmware)" if "mr_td" not in values else None
    return (
        f"mr_td measures only the virtual firmware, the RTMRs measure the kernel, command "
        f"line and application: add {', '.join(_need(values, 'mr_td') + rtmrs)} (`blindfold "
        f"policy init --from-evidence` writes them all), or for a register the deployment "
        f"does not use, set unsafe_ignore_rtmrN = true"
    )


def _snp_incomplete(values: dict[str, Any]) -> str | None:
    missing = _need(values, "measurement", "min_tcb")
    if missing:
        return (
            f"add {' and '.join(missing)} (min_tcb = {{ bootloader = N, tee = N, snp = N, "
            f"microcode = N }}: the oldest firmware you accept; `blindfold policy init "
            f"--from-evidence` writes both)"
        )
    return None


def _nitro_incomplete(values: dict[str, Any]) -> str | None:
    return "set pcr0 (the enclave image)" if "pcr0" not in values else None


# One spec per TEE kind; `attestation.kinds` ties each to its verifier and CLI name.

SIMULATION_POLICY = KindSpec(
    "simulation", (_unsafe_accept_any(), _hex_pin("measurement", 32)), _simulation_incomplete
)

SGX_POLICY = KindSpec(
    "sgx",
    (
        _unsafe_accept_any(),
        _hex_pin("mr_enclave", 32),
        _hex_pin("mr_signer", 32),
        Key(
            "isv_prod_id",
            "an integer 0..65535",
            _parse_int(0, 0xFFFF),
            lambda prod: [ValueEquals("isv_prod_id", prod)],
        ),
        _minimum("min_isv_svn", "isv_svn", 0xFFFF),
        *_hardware_common(),
        *_dcap_platform(),
    ),
    _sgx_incomplete,
)

TDX_POLICY = KindSpec(
    "tdx",
    (
        _unsafe_accept_any(),
        *(
            _hex_pin(name, 48)
            for name in ("mr_td", *TDX_RTMRS, "mr_seam", "mr_config_id", "mr_owner")
        ),
        _hex_pin("mr_owner_config", 48),
        _masked_pin("td_attributes", 8),
        _masked_pin("xfam", 8),
        *(
            Key(f"unsafe_ignore_{rtmr}", "true or false", _parse_bool, lambda _: [])
            for rtmr in TDX_RTMRS
        ),
        *_hardware_common(),
        *_dcap_platform(),
    ),
    _tdx_incomplete,
)

SEV_SNP_POLICY = KindSpec(
    "sev-snp",
    (
        _unsafe_accept_any(),
        _hex_pin("measurement", 48),
        _hex_pin("host_data", 32),
        _hex_pin("id_key_digest", 48),
        _hex_pin("author_key_digest", 48),
        _minimum("min_guest_svn", "guest_svn", 2**32 - 1),
        Key(
            "min_tcb",
            "a table { bootloader = N, tee = N, snp = N, microcode = N } of integers 0..255",
            _parse_table(snp.TCB_PARTS, _parse_int(0, 255)),
            lambda tcb: [AtLeast(f"reported_tcb_{part}", low) for part, low in tcb.items()],
        ),
        Key(
            "vmpl",
            "an integer 0..3",
            _parse_int(0, 3),
            lambda vmpl: [
                ValueEquals(
                    "vmpl",
                    vmpl,
                    "The report was requested from another VM privilege level than the "
                    "policy names (0: the guest kernel; higher levels sit beneath an SVSM "
                    "or paravisor). Set vmpl in the [sev-snp] section if that is intended.",
                )
            ],
            default=0,
        ),
        Key(
            "allow_smt",
            "true or false",
            _parse_bool,
            lambda allow: (
                []
                if allow
                else [
                    PolicyBit(
                        "policy",
                        snp.POLICY_SMT,
                        False,
                        "SMT allowed",
                        "The guest may run beside another thread on the same core; the "
                        "policy says allow_smt = false.",
                    )
                ]
            ),
            default=True,
        ),
        Key(
            "require_single_socket",
            "true or false",
            _parse_bool,
            lambda single: (
                [
                    PolicyBit(
                        "policy",
                        snp.POLICY_SINGLE_SOCKET,
                        True,
                        "SINGLE_SOCKET",
                        "The guest may be spread over several sockets; the policy says "
                        "require_single_socket = true.",
                    )
                ]
                if single
                else []
            ),
            default=False,
        ),
        *_hardware_common(),
    ),
    _snp_incomplete,
    always=(
        PolicyBit(
            "policy",
            snp.POLICY_MIGRATE_MA,
            False,
            "MIGRATE_MA",
            "A migration agent may move the guest's memory to another host; Blindfold "
            "does not accept guests that allow it.",
        ),
    ),
)

NITRO_POLICY = KindSpec(
    "nitro",
    (_unsafe_accept_any(), *(_hex_pin(f"pcr{i}", 48) for i in range(9)), *_hardware_common()),
    _nitro_incomplete,
)


def spec_for(kind: str) -> KindSpec:
    """The policy spec of a TEE kind (`attestation.kinds` is where kinds are listed)."""
    from blindfold.attestation.kinds import tee_kind

    return tee_kind(kind).policy


@dataclass(frozen=True)
class KindPolicy:
    """The accepted values for one TEE kind, as read (and type-checked) from its section."""

    kind: str
    values: dict[str, Any] = field(default_factory=dict)

    def rules(self) -> list[VerificationPolicy]:
        spec = spec_for(self.kind)
        rules: list[VerificationPolicy] = [KindIs((self.kind,)), *spec.always]
        for key in spec.keys:
            value = self.values.get(key.name, key.default)
            if value is not _ABSENT:
                rules.extend(key.rules(value))
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
        from blindfold.attestation.kinds import TEE_KINDS

        data = dict(data)
        deployment = data.pop("deployment", None)
        kinds = {}
        for kind, section in data.items():
            if kind not in TEE_KINDS:
                raise ConfigurationError(
                    f"{source}: unknown section [{kind}]; expected one of {', '.join(TEE_KINDS)}"
                    " (or [deployment])"
                )
            if not isinstance(section, dict):
                raise ConfigurationError(f"{source}: [{kind}] must be a table")
            kinds[kind] = KindPolicy(kind, check_section(kind, section, source))
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


def check_section(kind: str, section: dict[str, Any], source: str = "policy") -> dict[str, Any]:
    """Type-checks and normalises one section; raises ConfigurationError naming the key, the
    expected type and what was found, or what a complete section must add."""
    spec = spec_for(kind)
    values: dict[str, Any] = {}
    for name, value in section.items():
        key = spec.key(name)
        if key is None:
            allowed = ", ".join(key.name for key in spec.keys)
            raise ConfigurationError(
                f"{source}: [{kind}] has unknown key {name!r}; allowed: {allowed}"
            )
        try:
            values[name] = key.parse(value)
        except _Invalid as exc:
            raise ConfigurationError(
                f"{source}: [{kind}] {name} must be {key.expected}; {exc}"
            ) from None
    if not values.get("unsafe_accept_any_measurement"):
        missing = spec.incomplete(values)
        if missing:
            raise ConfigurationError(f"{source}: [{kind}] is incomplete: {missing}")
    return values


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
