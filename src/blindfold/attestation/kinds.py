"""The TEE kinds this client verifies: one `TeeKind` spec per kind, and the `Verifier` contract.

This module owns the list of kinds and everything known per kind outside its verifier and
its policy keys: the verifier it uses (and which `VerifierOptions` reach it), the claims its
Verdicts carry, the collateral an offline check needs, what `blindfold policy init
--from-evidence` pins, and whether the CLI offers it as `--kind`.

Adding a kind is one checklist that mypy enforces: write the verifier module (a function
matching `Verifier`), a `KindSpec` in `attestation.policy`, and one `TeeKind` below, whose
fields have no defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from blindfold.attestation import nitro, sevsnp, sgx, simulation, tdx
from blindfold.attestation import policy as policies
from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.formats import snp
from blindfold.attestation.verdict import Verdict
from blindfold.errors import EvidenceError


class Verifier(Protocol):
    """Checks that evidence of one kind is genuine at unix time `at` and returns its claims;
    raises `EvidenceError` naming the failed check. It never judges the claims: that is
    the policy's job."""

    def __call__(self, evidence: bytes, collateral: dict[str, bytes], at: int) -> Verdict: ...


@dataclass(frozen=True)
class VerifierOptions:
    """Options of the verifiers, passed by `verify_evidence`, `connect` and the CLI.

    `vcek_cache_dir`: a folder of AMD VCEK certificates for SEV-SNP servers that do not
    publish theirs, named as `formats.snp.vcek_cache_name` says (the AMD KDS parameters).
    """

    vcek_cache_dir: Path | None = None


# What `policy init --from-evidence` writes: the section and notes for the operator.
Pins = tuple[dict[str, Any], list[str]]


@dataclass(frozen=True)
class TeeKind:
    """Everything Blindfold knows about one TEE kind, outside its verifier and policy keys."""

    name: str  # Evidence.kind, the policy section, the CLI's --kind
    verifier: Callable[[VerifierOptions], Verifier]
    policy: policies.KindSpec
    claims: tuple[str, ...]  # the keys of Verdict.measurements
    missing_collateral: Callable[[Mapping[str, bytes]], str | None]  # for offline checks
    pins: Callable[[Verdict], Pins]
    # The claim a launcher sets that names a deployment (attestation.deployment), if any.
    launch_field: str | None
    offline_cli: bool  # offered as `blindfold attest --evidence FILE --kind NAME`


def _no_collateral(collateral: Mapping[str, bytes]) -> str | None:
    return None


def _dcap_collateral(collateral: Mapping[str, bytes]) -> str | None:
    if files.DCAP_QVL_JSON in collateral:
        return None
    missing = [name for name in files.PCS_FILES if name not in collateral]
    if not missing:
        return None
    return (
        f"expected {files.DCAP_QVL_JSON}, or the Intel PCS files {', '.join(files.PCS_FILES)} "
        f"(missing {', '.join(missing)})"
    )


def _snp_collateral(collateral: Mapping[str, bytes]) -> str | None:
    if files.VCEK in collateral:
        return None
    return (
        "expected the VCEK certificate (vcek.der or vcek.pem, or the certificate file itself), "
        "or give a VCEK cache folder (--vcek-cache) instead of --collateral"
    )


def _pin(verdict: Verdict, *names: str) -> dict[str, Any]:
    return {name: [verdict.measurements[name]] for name in names if name in verdict.measurements}


def _simulation_pins(verdict: Verdict) -> Pins:
    return _pin(verdict, "measurement"), []


def _sgx_pins(verdict: Verdict) -> Pins:
    m = verdict.measurements
    section = {
        **_pin(verdict, "mr_enclave", "mr_signer"),
        "isv_prod_id": m["isv_prod_id"],
        "min_isv_svn": m["isv_svn"],
    }
    return section, []


def _tdx_pins(verdict: Verdict) -> Pins:
    section = _pin(
        verdict,
        "mr_td",
        *policies.TDX_RTMRS,
        "mr_seam",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
    )
    section.update(
        td_attributes=verdict.measurements["td_attributes"], xfam=verdict.measurements["xfam"]
    )
    return section, []


def _snp_pins(verdict: Verdict) -> Pins:
    m = verdict.measurements
    guest_policy: int = m["policy"]
    section = {
        **_pin(verdict, "measurement"),
        "min_tcb": {part: m[f"reported_tcb_{part}"] for part in snp.TCB_PARTS},
        "vmpl": m["vmpl"],
        "min_guest_svn": m["guest_svn"],
        "allow_smt": bool(guest_policy >> snp.POLICY_SMT & 1),
        "require_single_socket": bool(guest_policy >> snp.POLICY_SINGLE_SOCKET & 1),
        **_pin(verdict, "id_key_digest", "author_key_digest"),
    }
    notes = []
    if guest_policy >> snp.POLICY_MIGRATE_MA & 1:
        notes.append(
            "the guest policy allows a migration agent (MIGRATE_MA), which every Blindfold "
            "policy refuses: launch the guest without it"
        )
    return section, notes


def _nitro_pins(verdict: Verdict) -> Pins:
    return _pin(verdict, "pcr0", "pcr1", "pcr2"), []


def _snp_verifier(options: VerifierOptions) -> Verifier:
    return partial(sevsnp.verify, vcek_cache_dir=options.vcek_cache_dir)


_DCAP_PLATFORM = ("tcb_eval_data_number", "dynamic_platform", "cached_keys", "smt_enabled")

KINDS: tuple[TeeKind, ...] = (
    TeeKind(
        name="simulation",
        verifier=lambda _: simulation.verify,
        policy=policies.SIMULATION_POLICY,
        claims=("measurement", "deployment_id"),  # deployment_id: "" unless --deployment-id
        missing_collateral=_no_collateral,
        pins=_simulation_pins,
        launch_field="deployment_id",
        offline_cli=False,
    ),
    TeeKind(
        name="sgx",
        verifier=lambda _: sgx.verify,
        policy=policies.SGX_POLICY,
        claims=(
            "mr_enclave",
            "mr_signer",
            "isv_prod_id",
            "isv_svn",
            "attributes",
            "cpu_svn",
            *_DCAP_PLATFORM,
        ),
        missing_collateral=_dcap_collateral,
        pins=_sgx_pins,
        launch_field=None,
        offline_cli=True,
    ),
    TeeKind(
        name="tdx",
        verifier=lambda _: tdx.verify,
        policy=policies.TDX_POLICY,
        claims=(
            "tee_tcb_svn",
            "mr_seam",
            "td_attributes",
            "xfam",
            "mr_td",
            "mr_config_id",
            "mr_owner",
            "mr_owner_config",
            *policies.TDX_RTMRS,
            *_DCAP_PLATFORM,
        ),
        missing_collateral=_dcap_collateral,
        pins=_tdx_pins,
        launch_field="mr_config_id",
        offline_cli=True,
    ),
    TeeKind(
        name="sev-snp",
        verifier=_snp_verifier,
        policy=policies.SEV_SNP_POLICY,
        claims=(
            "measurement",
            "host_data",
            "policy",
            *(f"reported_tcb_{part}" for part in snp.TCB_PARTS),
            "chip_id",
            "vmpl",
            "guest_svn",
            "version",
            "family_id",
            "image_id",
            "id_key_digest",
            "author_key_digest",
            "report_id",
            "platform_info",
        ),
        missing_collateral=_snp_collateral,
        pins=_snp_pins,
        launch_field="host_data",
        offline_cli=True,
    ),
    TeeKind(
        name="nitro",
        verifier=lambda _: nitro.verify,
        policy=policies.NITRO_POLICY,
        claims=(*(f"pcr{i}" for i in range(9)), "module_id"),  # only the PCRs present
        missing_collateral=_no_collateral,
        pins=_nitro_pins,
        launch_field=None,
        offline_cli=True,
    ),
)

TEE_KINDS = tuple(kind.name for kind in KINDS)
OFFLINE_CLI_KINDS = tuple(kind.name for kind in KINDS if kind.offline_cli)


def tee_kind(name: str) -> TeeKind:
    """The spec of the kind `name`; EvidenceError for a kind this client does not know."""
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise EvidenceError(f"unknown TEE kind {name!r}; this client knows {', '.join(TEE_KINDS)}")
