"""What a policy must pin per TEE kind, its safe defaults, and strict types (issue 7 §3).

Each attack starts from a verdict of real hardware evidence (../shared/attestation-vectors)
and changes what a hostile host controls: the kernel and command line of a TD (RTMRs), the
VM privilege level or guest policy bits of an SNP guest, an old enclave signed by the same
key. The policy is a pure function of the verdict, so these checks need no server.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blindfold.attestation.collateral import load_collateral
from blindfold.attestation.policy import Policy
from blindfold.attestation.verdict import Evidence, Verdict
from blindfold.attestation.verify import verify_evidence
from blindfold.cli import policy_section_from
from blindfold.errors import ConfigurationError, MeasurementMismatch, PolicyError

TDX = "tdx/dcapqvl-sample-fmspc-B0C06F000000"
SGX = "sgx/automata-fmspc-00606A000000"
SNP = "sev-snp/virtee-milan"
EVIDENCE_FILE = {"sgx": "quote.bin", "tdx": "quote.bin", "sev-snp": "report.bin"}


def _verdict(vectors_dir: Path, manifest: list[dict[str, Any]], vector_id: str) -> Verdict:
    vector = next(v for v in manifest if v["id"] == vector_id)
    folder = vectors_dir / vector["dir"]
    evidence = Evidence(
        vector["kind"],
        (folder / EVIDENCE_FILE[vector["kind"]]).read_bytes(),
        load_collateral(folder, vector["kind"]),
    )
    return verify_evidence(evidence, vector["verify_at"])


def _with(verdict: Verdict, **changes: Any) -> Verdict:
    """The verdict a host would produce by changing what it controls."""
    return dataclasses.replace(verdict, measurements={**verdict.measurements, **changes})


def _flip(hex_value: str) -> str:
    raw = bytearray(bytes.fromhex(hex_value))
    raw[-1] ^= 0xFF
    return raw.hex()


def _section(verdict: Verdict, **extra: Any) -> dict[str, Any]:
    section = policy_section_from(verdict)
    if verdict.tcb_status is not None:
        section["allowed_tcb_status"] = ["UpToDate", verdict.tcb_status]
    section.update(extra)
    return section


@pytest.fixture(scope="module")
def tdx(vectors_dir: Path, vector_manifest: list[dict[str, Any]]) -> Verdict:
    return _verdict(vectors_dir, vector_manifest, TDX)


@pytest.fixture(scope="module")
def snp(vectors_dir: Path, vector_manifest: list[dict[str, Any]]) -> Verdict:
    return _verdict(vectors_dir, vector_manifest, SNP)


@pytest.fixture(scope="module")
def sgx(vectors_dir: Path, vector_manifest: list[dict[str, Any]]) -> Verdict:
    return _verdict(vectors_dir, vector_manifest, SGX)


# --- TDX ---


def test_tdx_policy_with_only_mr_td_is_refused_as_incomplete(tdx: Verdict) -> None:
    # MRTD measures only the virtual firmware: with it alone, a host booting its own kernel
    # and command line (RTMR1, RTMR2) under the same firmware passed.
    with pytest.raises(ConfigurationError) as error:
        Policy.from_dict({"tdx": {"mr_td": [tdx.measurements["mr_td"]]}})
    message = str(error.value)
    for register in ("rtmr0", "rtmr1", "rtmr2", "rtmr3"):
        assert register in message
    assert "policy init --from-evidence" in message and "unsafe_ignore_rtmrN" in message


def test_tdx_policy_from_evidence_pins_every_rtmr_and_the_td_configuration(tdx: Verdict) -> None:
    section = _section(tdx)
    for key in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "mr_config_id"):
        assert section[key] == [tdx.measurements[key]]
    assert section["td_attributes"] == tdx.measurements["td_attributes"]
    assert section["xfam"] == tdx.measurements["xfam"]
    policy = Policy.from_dict({"tdx": section})
    policy.verify(tdx)
    for key in ("rtmr1", "rtmr2", "mr_seam", "mr_config_id", "mr_owner", "mr_owner_config"):
        with pytest.raises(MeasurementMismatch, match=key):
            policy.verify(_with(tdx, **{key: _flip(tdx.measurements[key])}))
    with pytest.raises(PolicyError, match="xfam"):
        policy.verify(_with(tdx, xfam=_flip(tdx.measurements["xfam"])))


def test_tdx_unsafe_ignore_is_per_register_and_exclusive(tdx: Verdict) -> None:
    section = _section(tdx)
    del section["rtmr3"]
    policy = Policy.from_dict({"tdx": {**section, "unsafe_ignore_rtmr3": True}})
    policy.verify(_with(tdx, rtmr3=_flip(tdx.measurements["rtmr3"])))
    with pytest.raises(MeasurementMismatch, match="rtmr2"):
        policy.verify(_with(tdx, rtmr2=_flip(tdx.measurements["rtmr2"])))
    with pytest.raises(ConfigurationError, match="choose one"):
        Policy.from_dict({"tdx": {**_section(tdx), "unsafe_ignore_rtmr3": True}})


def test_tdx_attribute_masks_pin_only_the_selected_bits(tdx: Verdict) -> None:
    found = bytes.fromhex(tdx.measurements["td_attributes"])
    other = bytearray(found)
    other[7] ^= 0x80  # a bit the mask leaves free
    section = _section(tdx, td_attributes={"value": found.hex(), "mask": "ff" * 7 + "7f"})
    policy = Policy.from_dict({"tdx": section})
    policy.verify(_with(tdx, td_attributes=bytes(other).hex()))
    other[3] ^= 0x10  # a pinned bit (SEPT_VE_DISABLE, bit 28)
    with pytest.raises(PolicyError, match="td_attributes"):
        policy.verify(_with(tdx, td_attributes=bytes(other).hex()))


# --- SEV-SNP ---


def test_snp_min_tcb_is_required(snp: Verdict) -> None:
    with pytest.raises(ConfigurationError, match="min_tcb"):
        Policy.from_dict({"sev-snp": {"measurement": [snp.measurements["measurement"]]}})
    partial = {**_section(snp), "min_tcb": {"snp": 1}}
    with pytest.raises(ConfigurationError, match="min_tcb must be a table"):
        Policy.from_dict({"sev-snp": partial})


def test_snp_vmpl_defaults_to_zero(snp: Verdict) -> None:
    section = _section(snp)
    assert section["vmpl"] == snp.measurements["vmpl"] == 0
    del section["vmpl"]
    policy = Policy.from_dict({"sev-snp": section})
    policy.verify(snp)
    # A report from a less privileged level (beneath an SVSM or paravisor the host controls).
    with pytest.raises(PolicyError, match="vmpl"):
        policy.verify(_with(snp, vmpl=2))
    Policy.from_dict({"sev-snp": {**section, "vmpl": 2}}).verify(_with(snp, vmpl=2))


def test_snp_guest_policy_bits(snp: Verdict) -> None:
    guest_policy = snp.measurements["policy"]
    policy = Policy.from_dict({"sev-snp": _section(snp, allow_smt=True)})
    with pytest.raises(PolicyError, match="MIGRATE_MA"):
        policy.verify(_with(snp, policy=guest_policy | 1 << 18))
    no_smt = Policy.from_dict({"sev-snp": _section(snp, allow_smt=False)})
    no_smt.verify(_with(snp, policy=guest_policy & ~(1 << 16)))
    with pytest.raises(PolicyError, match="SMT"):
        no_smt.verify(_with(snp, policy=guest_policy | 1 << 16))
    single = Policy.from_dict({"sev-snp": _section(snp, require_single_socket=True)})
    single.verify(_with(snp, policy=guest_policy | 1 << 20))
    with pytest.raises(PolicyError, match="SINGLE_SOCKET"):
        single.verify(_with(snp, policy=guest_policy & ~(1 << 20)))


def test_snp_id_and_author_key_digests(snp: Verdict) -> None:
    policy = Policy.from_dict({"sev-snp": _section(snp)})
    for key in ("id_key_digest", "author_key_digest"):
        with pytest.raises(MeasurementMismatch, match=key):
            policy.verify(_with(snp, **{key: _flip(snp.measurements[key])}))


# --- SGX ---


def test_sgx_mr_signer_alone_is_refused(sgx: Verdict) -> None:
    signer = sgx.measurements["mr_signer"]
    with pytest.raises(ConfigurationError, match="isv_prod_id and min_isv_svn"):
        Policy.from_dict({"sgx": {"mr_signer": [signer]}})
    with pytest.raises(ConfigurationError, match="min_isv_svn"):
        Policy.from_dict({"sgx": {"mr_signer": [signer], "isv_prod_id": 0}})
    section = _section(sgx)
    del section["mr_enclave"]
    policy = Policy.from_dict({"sgx": section})
    policy.verify(sgx)
    # An old, vulnerable enclave signed by the same key.
    with pytest.raises(PolicyError, match="isv_svn"):
        policy.verify(_with(sgx, isv_svn=sgx.measurements["isv_svn"] - 1))


# --- DCAP quote policy options ---


def test_dcap_tcb_evaluation_data_number(tdx: Verdict) -> None:
    number = tdx.measurements["tcb_eval_data_number"]
    assert isinstance(number, int) and number > 0
    assert _section(tdx)["min_tcb_eval_data_number"] == number
    with pytest.raises(PolicyError, match="tcb_eval_data_number"):
        Policy.from_dict({"tdx": _section(tdx, min_tcb_eval_data_number=number + 1)}).verify(tdx)


def test_dcap_platform_claims_refused_where_reported(tdx: Verdict) -> None:
    policy = Policy.from_dict({"tdx": _section(tdx, allow_dynamic_platform=False, allow_smt=False)})
    policy.verify(_with(tdx, dynamic_platform=None, smt_enabled=None))  # not reported
    with pytest.raises(PolicyError, match="dynamic_platform"):
        policy.verify(_with(tdx, dynamic_platform=True))
    with pytest.raises(PolicyError, match="smt_enabled"):
        policy.verify(_with(tdx, dynamic_platform=None, smt_enabled=True))


# --- types ---

SIM = {"measurement": ["ab" * 32]}


@pytest.mark.parametrize(
    ("kind", "section", "key", "expected"),
    [
        (
            "simulation",
            {**SIM, "unsafe_accept_any_measurement": "false"},
            "unsafe_accept_any_measurement",
            "true or false",
        ),
        ("simulation", {"measurement": "ab" * 31}, "measurement", "64-hex-digit"),
        ("simulation", {"measurement": 5}, "measurement", "64-hex-digit"),
        ("simulation", {"measurement": []}, "measurement", "non-empty list"),
        ("sgx", {"mr_enclave": ["00" * 32], "allow_debug": "no"}, "allow_debug", "true or false"),
        ("sgx", {"mr_enclave": ["00" * 32], "isv_prod_id": True}, "isv_prod_id", "integer"),
        ("sgx", {"mr_enclave": ["00" * 32], "min_isv_svn": 70000}, "min_isv_svn", "0..65535"),
        (
            "sgx",
            {"mr_enclave": ["00" * 32], "allowed_tcb_status": "UpToDate"},
            "allowed_tcb_status",
            "list",
        ),
        ("tdx", {"mr_td": ["00" * 32]}, "mr_td", "96-hex-digit"),
        ("tdx", {"mr_td": ["00" * 48], "xfam": {"value": "00" * 8}}, "xfam", "mask"),
        ("sev-snp", {"measurement": ["00" * 48], "vmpl": "0"}, "vmpl", "integer 0..3"),
        (
            "sev-snp",
            {
                "measurement": ["00" * 48],
                "min_tcb": {"bootloader": 1, "tee": 0, "snp": 8, "microcode": 1.5},
            },
            "min_tcb",
            "integers 0..255",
        ),
        ("nitro", {"pcr0": ["00" * 48], "pcr9": ["00" * 48]}, "pcr9", "unknown key"),
        ("sev-snp", {"measurement": ["00" * 48], "allow_smt": 1}, "allow_smt", "true or false"),
    ],
)
def test_every_value_is_type_checked(
    kind: str, section: dict[str, Any], key: str, expected: str
) -> None:
    with pytest.raises(ConfigurationError) as error:
        Policy.from_dict({kind: section})
    assert key in str(error.value) and expected in str(error.value)


def test_string_false_is_not_a_yes(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[simulation]\nunsafe_accept_any_measurement = "false"\n')
    with pytest.raises(ConfigurationError, match="unsafe_accept_any_measurement must be true"):
        Policy.load(path)


def test_policy_round_trips_through_toml(tdx: Verdict, snp: Verdict, tmp_path: Path) -> None:
    policy = Policy.from_dict({"tdx": _section(tdx), "sev-snp": _section(snp)})
    path = tmp_path / "policy.toml"
    path.write_text(policy.to_toml())
    loaded = Policy.load(path)
    assert loaded == policy
    loaded.verify(tdx)
    loaded.verify(snp)


def test_policy_init_from_tdx_evidence_writes_the_complete_set(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]], tmp_path: Path, tdx: Verdict
) -> None:
    vector = next(v for v in vector_manifest if v["id"] == TDX)
    folder = vectors_dir / vector["dir"]
    out = tmp_path / "policy.toml"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "blindfold",
            "policy",
            "init",
            "--from-evidence",
            str(folder / "quote.bin"),
            "--kind",
            "tdx",
            "--collateral",
            str(folder),
            "--at",
            str(vector["verify_at"]),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    written = Policy.load(out).kinds["tdx"].values
    for key in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "td_attributes", "xfam"):
        assert key in written
    Policy.load(out).verify(tdx)
