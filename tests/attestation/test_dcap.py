"""SGX and TDX verifiers against real hardware quotes from the attestation vector store."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest

from blindfold.attestation import dcap, sgx, tdx
from blindfold.attestation.collateral import load_collateral
from blindfold.attestation.dcap import PLATFORM_CLAIMS
from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.formats import dcap as dcap_format
from blindfold.attestation.verdict import Verdict
from blindfold.errors import ConfigurationError, EvidenceError

from conftest import VECTORS_DIR

_MANIFEST = VECTORS_DIR


def _dcap_ids(accepted: bool | None = None) -> list[str]:
    """Vector ids for parametrization; a placeholder lets the fixtures skip without the store."""
    try:
        data = json.loads((_MANIFEST / "manifest.json").read_text())
    except OSError:
        return ["vectors-missing"]
    vectors = data["vectors"] if isinstance(data, dict) else data
    return [
        v["id"]
        for v in vectors
        if v["kind"] in ("sgx", "tdx") and accepted in (None, v["expected"]["accept"])
    ]


ALL = _dcap_ids()
ACCEPTED = _dcap_ids(accepted=True)
REJECTED = _dcap_ids(accepted=False)

VERIFIERS: dict[str, Callable[[bytes, dict[str, bytes], int], Verdict]] = {
    "sgx": sgx.verify,
    "tdx": tdx.verify,
}
# Offsets inside the quote: header (48 bytes), then the report body.
REPORT_DATA_AT = {"sgx": 48 + 320, "tdx": 48 + 520}
MEASUREMENT_AT = {"sgx": 48 + 64, "tdx": 48 + 136}  # MRENCLAVE / MRTD
BODY_LEN = {"sgx": 384, "tdx": 584}


@pytest.fixture
def vector(
    request: pytest.FixtureRequest, vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> Any:
    by_id = {v["id"]: v for v in vector_manifest}
    v = dict(by_id[request.param])
    folder = vectors_dir / v["dir"]
    v["quote"] = (folder / "quote.bin").read_bytes()
    v["collateral"] = load_collateral(folder, v["kind"])
    v["verify"] = VERIFIERS[v["kind"]]
    return v


def _flip(data: bytes, at: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[at] ^= 1 << bit
    return bytes(out)


def _expected_measurements(v: dict[str, Any]) -> dict[str, Any]:
    """The manifest's measurements under the Verdict's key names (rt_mrN -> rtmrN)."""
    expected = {k.replace("rt_mr", "rtmr"): val for k, val in v["measurements"].items()}
    expected.pop("report_data")
    return expected


def _other_collateral(
    v: dict[str, Any], vectors_dir: Path, manifest: list[dict[str, Any]]
) -> list[Any]:
    others = [
        o
        for o in manifest
        if o["kind"] == v["kind"] and o["id"] != v["id"] and o["expected"]["accept"]
    ]
    return [(o, load_collateral(vectors_dir / o["dir"], o["kind"])) for o in others]


# --- every vector gives its manifest verdict ---


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_accepted_vector_verdict(vector: dict[str, Any]) -> None:
    verdict = vector["verify"](vector["quote"], vector["collateral"], vector["verify_at"])

    assert verdict.kind == vector["kind"]
    assert verdict.tcb_status == vector["expected"]["tcb_status"]
    assert verdict.advisory_ids == tuple(vector["expected"]["advisory_ids"])
    body = {k: v for k, v in verdict.measurements.items() if k not in PLATFORM_CLAIMS}
    assert body == _expected_measurements(vector)
    # dcap-qvl's claims the policy can judge: every quote has an evaluation data number.
    assert isinstance(verdict.measurements["tcb_eval_data_number"], int)
    assert {verdict.measurements[k] for k in PLATFORM_CLAIMS[1:]} <= {True, False, None}
    assert verdict.report_data == bytes.fromhex(vector["measurements"]["report_data"])
    assert len(verdict.report_data) == 64
    assert verdict.debug is False
    # Our window is exactly the manifest's: latest issue date .. earliest nextUpdate.
    assert (verdict.valid_from, verdict.valid_until) == tuple(vector["window"])


@pytest.mark.parametrize("vector", REJECTED, indirect=True)
def test_rejected_vector_names_the_reason(vector: dict[str, Any]) -> None:
    reason = vector["expected"]["error"].split(": ", 1)[1]  # drop the "ValueError: " prefix
    with pytest.raises(EvidenceError) as err:
        vector["verify"](vector["quote"], vector["collateral"], vector["verify_at"])
    assert reason in str(err.value)


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_split_pcs_files_give_the_same_verdict(vector: dict[str, Any]) -> None:
    split = {k: b for k, b in vector["collateral"].items() if k != files.DCAP_QVL_JSON}
    at = vector["verify_at"]
    assert vector["verify"](vector["quote"], split, at) == vector["verify"](
        vector["quote"], vector["collateral"], at
    )


@pytest.mark.parametrize("vector", ALL, indirect=True)
def test_assembled_collateral_equals_the_stored_json(vector: dict[str, Any]) -> None:
    split = {k: b for k, b in vector["collateral"].items() if k != files.DCAP_QVL_JSON}
    assembled = json.loads(files.assemble_dcap_qvl_json(split))
    assert assembled == json.loads(vector["collateral"][files.DCAP_QVL_JSON])


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_body_parse_agrees_with_dcap_qvl(vector: dict[str, Any]) -> None:
    quote = dcap_format.parse_quote(vector["quote"])
    report = dcap_qvl.verify_with_root_ca(
        quote.raw,
        dcap_qvl.QuoteCollateralV3.from_json(files.dcap_qvl_json(vector["collateral"])),
        dcap.intel_root_ca_der(),
        vector["verify_at"],
    )
    theirs = next(iter(json.loads(report.to_json())["report"].values()))
    verdict = vector["verify"](vector["quote"], vector["collateral"], vector["verify_at"])
    for key, value in verdict.measurements.items():
        if key not in PLATFORM_CLAIMS:
            assert theirs[key.replace("rtmr", "rt_mr")] == value, key
    assert theirs["report_data"] == verdict.report_data.hex()


# --- tampering is caught ---


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
@pytest.mark.parametrize("field", ["report_data", "measurement", "signature"])
def test_one_flipped_bit_is_rejected(vector: dict[str, Any], field: str) -> None:
    kind = vector["kind"]
    where = {
        "report_data": REPORT_DATA_AT[kind],
        "measurement": MEASUREMENT_AT[kind],
        "signature": 48 + BODY_LEN[kind] + 4 + 10,  # inside the ECDSA signature over the body
    }[field]
    tampered = _flip(vector["quote"], where, bit=3)
    with pytest.raises(EvidenceError, match="signature"):
        vector["verify"](tampered, vector["collateral"], vector["verify_at"])


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_another_vectors_collateral_is_rejected(
    vector: dict[str, Any], vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    others = _other_collateral(vector, vectors_dir, vector_manifest)
    assert others, "need a second vector of the same kind"
    for other, collateral in others:
        # At our time the other collateral is out of its window; at its own time the
        # chain/FMSPC checks must catch it.
        for at in (vector["verify_at"], other["verify_at"]):
            with pytest.raises(EvidenceError):
                vector["verify"](vector["quote"], collateral, at)


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_tampered_tcb_info_is_rejected(vector: dict[str, Any]) -> None:
    split = {k: b for k, b in vector["collateral"].items() if k != files.DCAP_QVL_JSON}
    split["tcb_info.json"] = split["tcb_info.json"].replace(
        b'"tcbEvaluationDataNumber":', b'"tcbEvaluationDataNumber": ', 1
    )
    with pytest.raises(EvidenceError, match=r"signature|TCB"):
        vector["verify"](vector["quote"], split, vector["verify_at"])


# --- time ---


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_one_second_after_the_window_is_rejected(vector: dict[str, Any]) -> None:
    with pytest.raises(EvidenceError, match="expired or not yet valid") as err:
        vector["verify"](vector["quote"], vector["collateral"], vector["window"][1] + 1)
    assert "fetch fresh collateral" in str(err.value)


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_one_second_before_the_window_is_rejected(vector: dict[str, Any]) -> None:
    # dcap-qvl alone accepts the Automata SGX vector here (CRL thisUpdate in the future).
    with pytest.raises(EvidenceError, match="expired or not yet valid"):
        vector["verify"](vector["quote"], vector["collateral"], vector["window"][0] - 1)


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_float_time_is_a_caller_bug(vector: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        vector["verify"](vector["quote"], vector["collateral"], float(vector["verify_at"]))


# --- framing ---


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_trailing_bytes_are_tolerated(vector: dict[str, Any]) -> None:
    at = vector["verify_at"]
    padded = vector["quote"] + b"\0" * 70 + b"\nextra bytes\n"
    assert vector["verify"](padded, vector["collateral"], at) == vector["verify"](
        vector["quote"], vector["collateral"], at
    )
    assert len(dcap_format.parse_quote(padded).raw) == vector["quote_len"]


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
@pytest.mark.parametrize("cut", [10, 48 + 100, 48 + 384 + 2, -1])
def test_truncated_quote_is_rejected(vector: dict[str, Any], cut: int) -> None:
    quote = vector["quote"][: vector["quote_len"]]
    with pytest.raises(EvidenceError, match="truncated"):
        vector["verify"](quote[:cut], vector["collateral"], vector["verify_at"])


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
@pytest.mark.parametrize("garbage", [b"", b"garbage" * 100, bytes(range(256)) * 20])
def test_garbage_is_rejected(vector: dict[str, Any], garbage: bytes) -> None:
    with pytest.raises(EvidenceError, match=r"truncated|not a supported DCAP quote"):
        vector["verify"](garbage, vector["collateral"], vector["verify_at"])


@pytest.mark.parametrize("vector", ALL, indirect=True)
def test_quote_of_the_other_kind_is_rejected(vector: dict[str, Any]) -> None:
    other = tdx.verify if vector["kind"] == "sgx" else sgx.verify
    with pytest.raises(EvidenceError, match="disagree"):
        other(vector["quote"], vector["collateral"], vector["verify_at"])


# --- TCB status and collateral handling ---


class _RevokedVerifier:
    """dcap-qvl answering with genuine-looking claims whose TCB status is Revoked."""

    def __init__(self, root_ca_der: bytes) -> None:
        del root_ca_der

    def verify_with_policy(self, *args: Any) -> Any:
        claims = {
            "tcb": {"status": "Revoked", "advisory_ids": [], "eval_data_number": 17},
            "platform": {"pck": {}},
        }
        return type("Claims", (), {"to_json": lambda self: json.dumps(claims)})()


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_revoked_status_is_rejected(
    vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dcap_qvl, "QuoteVerifier", _RevokedVerifier)
    with pytest.raises(EvidenceError, match="Revoked"):
        vector["verify"](vector["quote"], vector["collateral"], vector["verify_at"])


@pytest.mark.parametrize("vector", ACCEPTED, indirect=True)
def test_incomplete_collateral_names_what_is_missing(vector: dict[str, Any]) -> None:
    partial = {"tcb_info.json": vector["collateral"]["tcb_info.json"]}
    with pytest.raises(EvidenceError, match=r"qe_identity.json"):
        vector["verify"](vector["quote"], partial, vector["verify_at"])


@pytest.mark.parametrize("vector", ["sgx/dcapqvl-sample-fmspc-00A067110000"], indirect=True)
def test_load_collateral_forms(vector: dict[str, Any], vectors_dir: Path, tmp_path: Path) -> None:
    folder = vectors_dir / vector["dir"]
    assert "quote.bin" not in vector["collateral"]
    assert set(vector["collateral"]) == set(vector["files"]) - {"quote.bin"}

    single = load_collateral(folder / files.DCAP_QVL_JSON, "sgx")
    assert single == {files.DCAP_QVL_JSON: vector["collateral"][files.DCAP_QVL_JSON]}

    with pytest.raises(ConfigurationError, match="no sgx collateral"):
        load_collateral(tmp_path, "sgx")
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_collateral(tmp_path / "nope", "sgx")
    with pytest.raises(ConfigurationError, match="not dcap-qvl"):
        load_collateral(folder / "tcb_info.json", "sgx")


def test_load_collateral_vcek(vectors_dir: Path, tmp_path: Path) -> None:
    der = (vectors_dir / "sev-snp" / "virtee-milan" / "vcek.der").read_bytes()
    b64 = base64.encodebytes(der)
    pem = b"-----BEGIN CERTIFICATE-----\n" + b64 + b"-----END CERTIFICATE-----\n"
    (tmp_path / "vcek.pem").write_bytes(pem)
    (tmp_path / "junk.der").write_bytes(b"not a certificate")
    assert load_collateral(vectors_dir / "sev-snp" / "virtee-milan" / "vcek.der", "sev-snp") == {
        "vcek.der": der
    }
    assert load_collateral(tmp_path / "vcek.pem", "sev-snp") == {"vcek.der": der}
    folder = load_collateral(vectors_dir / "sev-snp" / "virtee-milan", "sev-snp")
    assert folder["vcek.der"] == der and "report.bin" not in folder
    with pytest.raises(ConfigurationError, match="neither"):
        load_collateral(tmp_path / "junk.der", "sev-snp")
