"""Policies applied to verdicts of real hardware evidence, the TOML format, and the offline
CLI (`blindfold attest --evidence`, `blindfold policy init --from-evidence`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blindfold.attestation.collateral import load_collateral
from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.attestation.verify import verify_evidence
from blindfold.errors import ConfigurationError, MeasurementMismatch, PolicyError, TeeKindNotAllowed

EVIDENCE_FILE = {
    "sgx": "quote.bin",
    "tdx": "quote.bin",
    "sev-snp": "report.bin",
    "nitro": "attestation_doc.cbor",
}


def _vector(manifest: list[dict[str, Any]], vector_id: str) -> dict[str, Any]:
    return next(v for v in manifest if v["id"] == vector_id)


def _verdict(vectors_dir: Path, vector: dict[str, Any]) -> Verdict:
    folder = vectors_dir / vector["dir"]
    evidence = Evidence(
        vector["kind"],
        (folder / EVIDENCE_FILE[vector["kind"]]).read_bytes(),
        load_collateral(folder, vector["kind"]) if vector["kind"] != "nitro" else {},
    )
    return verify_evidence(evidence, vector["verify_at"])


def _policy_pinning(verdict: Verdict, **extra: Any) -> Policy:
    from blindfold.cli import policy_section_from

    section = policy_section_from(verdict)
    section.update(extra)
    return Policy.from_dict({verdict.kind: section})


def test_default_policy_refuses_sgx_tcb_needing_configuration(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    verdict = _verdict(
        vectors_dir, _vector(vector_manifest, "sgx/dcapqvl-sample-fmspc-00A067110000")
    )
    with pytest.raises(PolicyError) as error:
        _policy_pinning(verdict).verify(verdict)
    message = str(error.value)
    assert "ConfigurationAndSWHardeningNeeded" in message
    assert "INTEL-SA-00289" in message and "INTEL-SA-00615" in message
    assert "allowed_tcb_status" in message
    # Opting in by name accepts it.
    _policy_pinning(
        verdict, allowed_tcb_status=["UpToDate", "ConfigurationAndSWHardeningNeeded"]
    ).verify(verdict)


def test_tdx_out_of_date_needs_opt_in_and_up_to_date_passes(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    good = _verdict(vectors_dir, _vector(vector_manifest, "tdx/dcapqvl-sample-fmspc-B0C06F000000"))
    _policy_pinning(good).verify(good)
    old = _verdict(vectors_dir, _vector(vector_manifest, "tdx/automata-fmspc-00806F050000"))
    with pytest.raises(PolicyError, match="OutOfDate"):
        _policy_pinning(old).verify(old)
    _policy_pinning(old, allowed_tcb_status=["OutOfDate"]).verify(old)


def test_wrong_measurement_names_field_expected_and_found(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    verdict = _verdict(
        vectors_dir, _vector(vector_manifest, "tdx/dcapqvl-sample-fmspc-B0C06F000000")
    )
    policy = _policy_pinning(verdict, mr_td=["00" * 48])
    with pytest.raises(MeasurementMismatch) as error:
        policy.verify(verdict)
    assert error.value.field == "tdx mr_td"
    assert error.value.expected == "00" * 48
    assert error.value.found == verdict.measurements["mr_td"]


def test_debug_evidence_fails_default_policy(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    for vector_id in (
        "nitro/evervault-2022-10-12-debug-userdata",
        "nitro/evervault-2023-09-18-debug-nonce",
        "sev-snp/gosevguest-milan",
    ):
        verdict = _verdict(vectors_dir, _vector(vector_manifest, vector_id))
        assert verdict.debug
        with pytest.raises(PolicyError, match="debug"):
            _policy_pinning(verdict).verify(verdict)
        _policy_pinning(verdict, allow_debug=True).verify(verdict)
    production = _verdict(
        vectors_dir, _vector(vector_manifest, "nitro/evervault-2022-10-13-production-pcrs")
    )
    _policy_pinning(production).verify(production)


def test_snp_minimum_tcb(vectors_dir: Path, vector_manifest: list[dict[str, Any]]) -> None:
    verdict = _verdict(vectors_dir, _vector(vector_manifest, "sev-snp/virtee-milan"))
    _policy_pinning(verdict).verify(verdict)
    higher = verdict.measurements["reported_tcb_snp"] + 1
    policy = _policy_pinning(verdict)
    section = dict(policy.kinds["sev-snp"].values)
    section["min_tcb"] = {**section["min_tcb"], "snp": higher}
    with pytest.raises(PolicyError, match="reported_tcb_snp"):
        Policy.from_dict({"sev-snp": section}).verify(verdict)


def test_kind_not_in_policy(vectors_dir: Path, vector_manifest: list[dict[str, Any]]) -> None:
    verdict = _verdict(vectors_dir, _vector(vector_manifest, "sev-snp/virtee-milan"))
    with pytest.raises(TeeKindNotAllowed, match=r"\[sev-snp\]"):
        Policy.simulation("ab" * 32).verify(verdict)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[sgx]\nmr_enclav = ['00']\n", "unknown key 'mr_enclav'"),
        ("[tpm]\nx = 1\n", "unknown section"),
        ("[sgx]\nallow_debug = true\n", "is incomplete: set mr_enclave"),
        ("[sgx]\nmr_enclave = ['zz']\n", "mr_enclave must be a 64-hex-digit string"),
        ("[sgx\n", "not valid TOML"),
        ("", "accepts no TEE kind"),
    ],
)
def test_bad_policy_files(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=problem):
        Policy.load(path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blindfold", *args], capture_output=True, text=True, timeout=60
    )


def test_offline_attest_and_policy_from_evidence(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]], tmp_path: Path
) -> None:
    vector = _vector(vector_manifest, "sgx/automata-fmspc-00606A000000")
    folder = vectors_dir / vector["dir"]
    common = ["--kind", "sgx", "--collateral", str(folder), "--at", str(vector["verify_at"])]
    shown = _cli("attest", "--evidence", str(folder / "quote.bin"), *common)
    assert shown.returncode == 0, shown.stderr
    verdict = json.loads(shown.stdout)
    assert verdict["tcb_status"] == "SWHardeningNeeded"
    assert verdict["advisory_ids"] == ["INTEL-SA-00615"]
    assert verdict["measurements"]["mr_enclave"] == vector["measurements"]["mr_enclave"]

    policy = tmp_path / "policy.toml"
    made = _cli(
        "policy",
        "init",
        "--from-evidence",
        str(folder / "quote.bin"),
        *common,
        "--out",
        str(policy),
    )
    assert made.returncode == 0, made.stderr
    assert "SWHardeningNeeded" in made.stderr  # the operator is told what to opt into
    refused = _cli(
        "attest", "--evidence", str(folder / "quote.bin"), *common, "--policy", str(policy)
    )
    assert refused.returncode == 1 and "SWHardeningNeeded" in refused.stderr
    policy.write_text(
        policy.read_text().replace(
            'allowed_tcb_status = ["UpToDate"]',
            'allowed_tcb_status = ["UpToDate", "SWHardeningNeeded"]',
        )
    )
    accepted = _cli(
        "attest", "--evidence", str(folder / "quote.bin"), *common, "--policy", str(policy)
    )
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["policy"] == "accepted"

    late = _cli(
        "attest",
        "--evidence",
        str(folder / "quote.bin"),
        "--kind",
        "sgx",
        "--collateral",
        str(folder),
        "--at",
        str(vector["window"][1] + 1),
    )
    assert late.returncode == 1 and "error:" in late.stderr


def test_offline_attest_rejects_the_bad_tdx_vector(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    vector = _vector(vector_manifest, "tdx/gotdxguest-spr-e4-fmspc-50806F000000")
    folder = vectors_dir / vector["dir"]
    result = _cli(
        "attest",
        "--evidence",
        str(folder / "quote.bin"),
        "--kind",
        "tdx",
        "--collateral",
        str(folder / "collateral.dcap-qvl.json"),
        "--at",
        str(vector["verify_at"]),
    )
    assert result.returncode == 1
    assert "No matching TCB level" in result.stderr


def test_offline_snp_with_vcek_file(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    vector = _vector(vector_manifest, "sev-snp/virtee-milan")
    folder = vectors_dir / vector["dir"]
    result = _cli(
        "attest",
        "--evidence",
        str(folder / "report.bin"),
        "--kind",
        "sev-snp",
        "--collateral",
        str(folder / "vcek.der"),
        "--at",
        str(vector["verify_at"]),
    )
    assert result.returncode == 0, result.stderr
    assert (
        json.loads(result.stdout)["measurements"]["measurement"]
        == vector["measurements"]["measurement"]
    )
