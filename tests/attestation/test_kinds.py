"""The typed verifier contract: one TeeKind spec per kind, options that reach the verifier,
and policy combinators that never pass by default."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

import blindfold
from blindfold.attestation.collateral import load_collateral
from blindfold.attestation.formats import snp
from blindfold.attestation.kinds import KINDS, TEE_KINDS, VerifierOptions, tee_kind
from blindfold.attestation.policy import AllOf, MeasurementIn, Policy
from blindfold.attestation.simulation import SimulationSigner
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.attestation.verify import verify_evidence, verify_server_evidence
from blindfold.cli import main
from blindfold.errors import ConfigurationError, EvidenceError

from helpers import write_self_signed

# --- AllOf ---


def _verdict() -> Verdict:
    return Verdict(kind="simulation", measurements={"measurement": "00" * 32}, report_data=b"")


def test_attack_empty_allof_refuses_instead_of_accepting_everything() -> None:
    # An empty rule list used to accept any evidence: a policy built from an empty section
    # or a filtered list would have trusted every server.
    with pytest.raises(ConfigurationError, match=r"AllOf\(\[\]\) has no rule"):
        AllOf([]).verify(_verdict())
    rules = [MeasurementIn("measurement", ("11" * 32,))]
    combined = AllOf(rules)
    rules.clear()  # the caller's list changing later does not empty the rules
    with pytest.raises(blindfold.MeasurementMismatch):
        combined.verify(_verdict())


def test_anyof_is_gone() -> None:
    from blindfold.attestation import policy

    assert not hasattr(policy, "AnyOf")


# --- one spec per kind ---


def test_every_kind_has_one_spec_and_its_policy_section() -> None:
    assert TEE_KINDS == ("simulation", "sgx", "tdx", "sev-snp", "nitro")
    for kind in KINDS:
        assert kind.policy.kind == kind.name
        assert tee_kind(kind.name) is kind
    with pytest.raises(EvidenceError, match="unknown TEE kind 'tpm'; this client knows"):
        tee_kind("tpm")
    with pytest.raises(EvidenceError, match="unknown TEE kind 'tpm'"):
        verify_evidence(Evidence("tpm", b"x"))


def _vector_verdicts(vectors_dir: Path, manifest: list[dict[str, Any]]) -> list[Verdict]:
    verdicts = []
    for vector in manifest:
        if not vector["expected"]["accept"]:
            continue
        folder = vectors_dir / vector["dir"]
        evidence_file = next(
            folder / name
            for name in ("quote.bin", "report.bin", "attestation_doc.cbor")
            if (folder / name).exists()
        )
        collateral = load_collateral(folder, vector["kind"])
        evidence = Evidence(vector["kind"], evidence_file.read_bytes(), collateral)
        verdicts.append(verify_evidence(evidence, vector["verify_at"]))
    return verdicts


def test_claims_of_each_kind_are_what_its_verifier_reports(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    verdicts = _vector_verdicts(vectors_dir, vector_manifest)
    signer = SimulationSigner()
    verdicts.append(verify_evidence(Evidence("simulation", signer.evidence(bytes(64)))))
    assert {v.kind for v in verdicts} == set(TEE_KINDS)
    for verdict in verdicts:
        claims = set(tee_kind(verdict.kind).claims)
        if verdict.kind == "nitro":  # only the PCRs the document carries
            assert set(verdict.measurements) <= claims
            assert {"pcr0", "module_id"} <= set(verdict.measurements)
        else:
            assert set(verdict.measurements) == claims, verdict.kind


def test_policy_init_pins_load_as_a_complete_policy(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    for verdict in _vector_verdicts(vectors_dir, vector_manifest):
        section, _notes = tee_kind(verdict.kind).pins(verdict)
        Policy.from_dict({verdict.kind: section})


# --- options reach the verifier ---


def _cache_name(report: bytes) -> str:
    parsed = snp.parse_report(report)
    return snp.vcek_cache_name(parsed.chip_id, parsed.reported_tcb)


def test_vcek_cache_reaches_the_snp_verifier(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]], tmp_path: Path
) -> None:
    vector = next(v for v in vector_manifest if v["id"] == "sev-snp/virtee-milan")
    folder = vectors_dir / vector["dir"]
    report = (folder / "report.bin").read_bytes()
    parsed = snp.parse_report(report)
    shutil.copy(
        folder / "vcek.der", tmp_path / snp.vcek_cache_name(parsed.chip_id, parsed.reported_tcb)
    )
    evidence = Evidence("sev-snp", report, {})  # the server published no VCEK
    with pytest.raises(EvidenceError, match="no VCEK"):
        verify_evidence(evidence, vector["verify_at"])
    verdict = verify_evidence(
        evidence, vector["verify_at"], VerifierOptions(vcek_cache_dir=tmp_path)
    )
    assert verdict.measurements["measurement"] == vector["measurements"]["measurement"]


def test_cli_offline_attest_with_a_vcek_cache(
    vectors_dir: Path,
    vector_manifest: list[dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vector = next(v for v in vector_manifest if v["id"] == "sev-snp/virtee-milan")
    folder = vectors_dir / vector["dir"]
    parsed = snp.parse_report((folder / "report.bin").read_bytes())
    cache = tmp_path / "vceks"
    cache.mkdir()
    shutil.copy(
        folder / "vcek.der", cache / snp.vcek_cache_name(parsed.chip_id, parsed.reported_tcb)
    )
    argv = ["attest", "--evidence", str(folder / "report.bin"), "--kind", "sev-snp"]
    argv += ["--at", str(vector["verify_at"]), "--vcek-cache", str(cache)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["genuine"] is True
    assert printed["measurements"]["chip_id"] == parsed.chip_id.hex()


# --- the simulation warning has its own class ---


def test_simulation_warning_is_a_filterable_class(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from blindfold.attestation.binding import expected_report_data

    certificate_pem, _key = write_self_signed(tmp_path, "simulation")
    certificate = x509.load_pem_x509_certificate(certificate_pem.read_bytes())
    certificate_der = certificate.public_bytes(Encoding.DER)
    report_data = expected_report_data(certificate_der, None)
    evidence = Evidence("simulation", SimulationSigner().evidence(report_data))
    policy = Policy.simulation()
    assert issubclass(blindfold.SimulationWarning, UserWarning)
    with pytest.warns(blindfold.SimulationWarning, match="SIMULATION TEE"):
        verify_server_evidence(evidence, certificate_der, policy, nonce=None, allow_simulation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=blindfold.SimulationWarning)
        verify_server_evidence(evidence, certificate_der, policy, nonce=None, allow_simulation=True)
