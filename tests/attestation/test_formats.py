"""The shared TEE wire formats (attestation/formats) against the real vectors.

Each format is read once for both sides, so these tests pin what it reads: every field the
vector store's manifest lists, cross-checked with an independent parser (dcap-qvl) where one
exists, and round trips (the pieces a quote is cut into put back together give the quote;
the signed text cut out of Intel's JSON is byte for byte what dcap-qvl's JSON holds).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest

from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.formats import dcap, nitro, snp
from blindfold.errors import EvidenceError

# The manifest names the TD report's RTMRs rt_mr0..3; Blindfold's claims call them rtmr0..3.
_MANIFEST_NAME = {f"rtmr{i}": f"rt_mr{i}" for i in range(4)}


def _vectors(vector_manifest: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [v for v in vector_manifest if v["kind"] in kinds]


# --- DCAP quotes ---


def test_quote_fields_match_the_manifest_and_dcap_qvl(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    vectors = _vectors(vector_manifest, "sgx", "tdx")
    assert len(vectors) == 5
    for vector in vectors:
        data = (vectors_dir / vector["dir"] / "quote.bin").read_bytes()
        quote = dcap.parse_quote(data)
        expected = vector["measurements"]
        assert quote.kind == vector["kind"]
        assert quote.version == vector["quote_version"]
        assert len(quote.raw) == vector["quote_len"]
        assert quote.report_data.hex() == expected["report_data"]
        for name, value in quote.claims().items():
            assert value == expected[_MANIFEST_NAME.get(name, name)], (vector["id"], name)
        assert quote.debug is False
        # dcap-qvl parses the same quote independently.
        theirs = dcap_qvl.parse_quote(quote.raw)
        assert theirs.header.version == quote.version
        assert theirs.is_tdx() == (quote.kind == "tdx")
        pck = dcap.pck_certificate(quote)
        assert (pck.fmspc, pck.ca) == (vector["fmspc"], vector["pck_ca"])
        assert pck.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")
        assert not pck.chain_pem.endswith(b"\0")


def test_quote_round_trip(vectors_dir: Path, vector_manifest: list[dict[str, Any]]) -> None:
    for vector in _vectors(vector_manifest, "sgx", "tdx"):
        data = (vectors_dir / vector["dir"] / "quote.bin").read_bytes()
        quote = dcap.parse_quote(data)
        signature_data = quote.raw[dcap.HEADER_LEN + len(quote.body) + 4 :]
        rebuilt = (
            quote.raw[: dcap.HEADER_LEN]
            + quote.body
            + struct.pack("<I", len(signature_data))
            + signature_data
        )
        assert rebuilt == quote.raw
        # Trailing bytes of the file are not part of the quote, and parsing is idempotent.
        assert data.startswith(quote.raw)
        assert dcap.parse_quote(quote.raw) == quote


def test_quote_debug_bits_are_read(vectors_dir: Path) -> None:
    sgx = (vectors_dir / "sgx/dcapqvl-sample-fmspc-00A067110000" / "quote.bin").read_bytes()
    tdx = (vectors_dir / "tdx/dcapqvl-sample-fmspc-B0C06F000000" / "quote.bin").read_bytes()
    sgx_debug = bytearray(sgx)
    sgx_debug[dcap.HEADER_LEN + dcap.SGX_FIELDS["attributes"].start] |= dcap.SGX_DEBUG_FLAG
    tdx_debug = bytearray(tdx)
    tdx_debug[dcap.HEADER_LEN + dcap.TDX_FIELDS["td_attributes"].start] |= dcap.TDX_DEBUG_FLAG
    assert dcap.parse_quote(bytes(sgx_debug)).debug
    assert dcap.parse_quote(bytes(tdx_debug)).debug


def test_v5_and_unknown_quotes_are_refused_with_the_reason(vectors_dir: Path) -> None:
    tdx = (vectors_dir / "tdx/dcapqvl-sample-fmspc-B0C06F000000" / "quote.bin").read_bytes()
    v5 = struct.pack("<H", 5) + tdx[2:48] + struct.pack("<HI", 2, 584) + tdx[48:]
    with pytest.raises(EvidenceError, match=r"version 5 .*TDX 1.5.* not supported"):
        dcap.parse_quote(v5)
    with pytest.raises(EvidenceError, match="version 7"):
        dcap.parse_quote(struct.pack("<H", 7) + tdx[2:])
    tdx_v3 = struct.pack("<H", 3) + tdx[2:]
    with pytest.raises(EvidenceError, match="version 3 with TEE type 0x81"):
        dcap.parse_quote(tdx_v3)
    with pytest.raises(EvidenceError, match="kind 'sgx' is a DCAP quote of TEE type 'tdx'"):
        dcap.require_kind(dcap.parse_quote(tdx), "sgx")


# --- SEV-SNP reports ---


def test_snp_report_fields_match_the_manifest(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    vectors = _vectors(vector_manifest, "sev-snp")
    assert len(vectors) == 2
    for vector in vectors:
        report = snp.parse_report((vectors_dir / vector["dir"] / "report.bin").read_bytes())
        expected = vector["measurements"]
        for name in (
            "report_data",
            "measurement",
            "host_data",
            "id_key_digest",
            "author_key_digest",
            "report_id",
            "chip_id",
            "family_id",
            "image_id",
        ):
            assert getattr(report, name).hex() == expected[name], (vector["id"], name)
        raw_tcb = bytes.fromhex(expected["reported_tcb"])
        assert report.reported_tcb == snp.Tcb.from_bytes(raw_tcb)
        assert report.raw[0x180:0x188] == raw_tcb
        assert report.signature_algo == snp.SIG_ALGO_ECDSA_P384_SHA384
        assert report.signing_key == snp.SIGNING_KEY_VCEK
        assert report.signed_bytes == report.raw[: snp.SIGNED_LEN]
    virtee, gosevguest = (
        snp.parse_report((vectors_dir / v["dir"] / "report.bin").read_bytes()) for v in vectors
    )
    # PROVENANCE.md: virtee's policy is 0x30000 (SMT, no debug), go-sev-guest's 0xB0000 (debug).
    assert (virtee.policy, virtee.debug) == (0x30000, False)
    assert (gosevguest.policy, gosevguest.debug) == (0xB0000, True)
    assert virtee.reported_tcb == snp.Tcb(bootloader=3, tee=0, snp=8, microcode=0x73)


def test_snp_report_signature_round_trip(vectors_dir: Path) -> None:
    raw = (vectors_dir / "sev-snp/virtee-milan/report.bin").read_bytes()
    report = snp.parse_report(raw)
    width = snp.SIG_COMPONENT_LEN
    r = report.signature_r.to_bytes(width, "little")
    s = report.signature_s.to_bytes(width, "little")
    at = snp.SIGNATURE_OFFSET
    assert raw[at : at + 2 * width] == r + s
    assert report.signature_r.bit_length() <= 384 and report.signature_s.bit_length() <= 384


def test_snp_report_must_be_exact(vectors_dir: Path) -> None:
    raw = (vectors_dir / "sev-snp/virtee-milan/report.bin").read_bytes()
    with pytest.raises(EvidenceError, match="trailing data"):
        snp.parse_report(raw + b"\0")
    with pytest.raises(EvidenceError, match="truncated"):
        snp.parse_report(raw[:-1])
    with pytest.raises(EvidenceError, match="version: expected 2 or later, found 1"):
        snp.parse_report(struct.pack("<I", 1) + raw[4:])


def test_vcek_names_follow_amd_kds() -> None:
    chip, tcb = bytes(range(64)), snp.Tcb(bootloader=3, tee=0, snp=8, microcode=115)
    assert snp.vcek_cache_name(chip, tcb) == f"{chip.hex()}-3-0-8-115.der"
    assert snp.kds_vcek_path("Milan", chip, tcb) == (
        f"/vcek/v1/Milan/{chip.hex()}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115"
    )


def test_cert_table_round_trip() -> None:
    entries = [(snp.GUID_VCEK, b"vcek-der"), (snp.GUID_ASK, b"ask"), (snp.GUID_ARK, b"ark")]
    header = (len(entries) + 1) * 24
    table, body = b"", b""
    for guid, der in entries:
        table += struct.pack("<16sII", guid.bytes, header + len(body), len(der))
        body += der
    blob = table + bytes(24) + body
    assert snp.parse_cert_table(blob) == {"vcek": b"vcek-der", "ask": b"ask", "ark": b"ark"}
    with pytest.raises(EvidenceError, match="no terminating entry"):
        snp.parse_cert_table(struct.pack("<16sII", snp.GUID_VCEK.bytes, 0, 4))
    with pytest.raises(EvidenceError, match="points past its blob"):
        snp.parse_cert_table(table)


# --- Nitro attestation documents ---


def test_nitro_documents_match_the_manifest_and_round_trip(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    import cbor2

    vectors = _vectors(vector_manifest, "nitro")
    assert len(vectors) == 3
    for vector in vectors:
        data = (vectors_dir / vector["dir"] / "attestation_doc.cbor").read_bytes()
        envelope, doc = nitro.decode(data)
        assert envelope.algorithm() == nitro.COSE_ALG_ES384
        assert len(envelope.signature) == nitro.ES384_SIGNATURE_LEN
        assert doc["module_id"] == vector["module_id"]
        assert doc["timestamp"] == vector["timestamp_ms"]
        for index, value in vector["measurements"]["pcrs"].items():
            assert doc["pcrs"][int(index)].hex() == value
        for name in ("nonce", "user_data", "public_key"):
            found = doc.get(name)
            assert (found.hex() if found is not None else None) == vector[name]
        # Re-encoding the decoded envelope gives back the document's bytes.
        untagged = cbor2.loads(data)
        assert cbor2.dumps(untagged) == data
        assert [untagged[0], untagged[2], untagged[3]] == [
            envelope.protected,
            envelope.payload,
            envelope.signature,
        ]
        not_after = nitro.leaf_certificate(doc).not_valid_after_utc.timestamp()
        assert int(not_after) == vector["window"][1]
        # Tagged (18) is the same document; any other tag is not.
        assert nitro.decode(cbor2.dumps(cbor2.CBORTag(18, untagged)))[1] == doc
        with pytest.raises(EvidenceError, match="CBOR tag 17"):
            nitro.decode(cbor2.dumps(cbor2.CBORTag(17, untagged)))


# --- collateral files ---


def _dcap_folders(vectors_dir: Path, vector_manifest: list[dict[str, Any]]) -> Iterator[Path]:
    for vector in _vectors(vector_manifest, "sgx", "tdx"):
        yield vectors_dir / vector["dir"]


def test_signed_text_is_exactly_what_intel_signed(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    for folder in _dcap_folders(vectors_dir, vector_manifest):
        stored = json.loads((folder / files.DCAP_QVL_JSON).read_text())
        for name, key, field in (
            (files.TCB_INFO, "tcbInfo", "tcb_info"),
            (files.QE_IDENTITY, "enclaveIdentity", "qe_identity"),
        ):
            text, signature = files.signed_body((folder / name).read_bytes(), key, name)
            assert text == stored[field]  # byte for byte, not merely the same JSON value
            assert signature == stored[f"{field}_signature"]


def test_signed_text_cut_whatever_the_key_order_and_spacing(vectors_dir: Path) -> None:
    folder = vectors_dir / "sgx/dcapqvl-sample-fmspc-00A067110000"
    original = (folder / files.TCB_INFO).read_bytes()
    text, signature = files.signed_body(original, "tcbInfo", files.TCB_INFO)
    # Signature first and generous whitespace: a regex for one layout missed these.
    reordered = f'\n {{ "signature" : "{signature}" ,\n\t"tcbInfo":  {text} }}\n'.encode()
    assert files.signed_body(reordered, "tcbInfo", files.TCB_INFO) == (text, signature)


@pytest.mark.parametrize(
    "body",
    [
        b'{"tcbInfo": {"a": 1}, "tcbInfo": {"a": 2}, "signature": "00"}',  # which one is signed?
        b'{"tcbInfo": {"a": 1}, "signature": "00"} {"tcbInfo": {}}',  # trailing document
        b'{"tcbInfo": {"a": 1}, "signature": "not hex"}',
        b'{"tcbInfo": {"a": 1}, "signature": 12}',
        b'{"tcbInfo": "a string", "signature": "00"}',
        b'{"tcbInfo": {"a": 1}}',
        b"\xff\xfe",
    ],
)
def test_malformed_signed_json_is_refused(body: bytes) -> None:
    with pytest.raises(EvidenceError, match=r"tcb_info.json is not an Intel PCS response"):
        files.signed_body(body, "tcbInfo", files.TCB_INFO)


def test_assembled_json_and_window_agree_with_the_manifest(
    vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    for vector in _vectors(vector_manifest, "sgx", "tdx"):
        folder = vectors_dir / vector["dir"]
        split = {name: (folder / name).read_bytes() for name in files.PCS_FILES}
        assembled = files.assemble_dcap_qvl_json(split)
        assert json.loads(assembled) == json.loads((folder / files.DCAP_QVL_JSON).read_text())
        quote = dcap.parse_quote((folder / "quote.bin").read_bytes())
        window = files.validity_window(assembled, dcap.pck_certificate(quote).chain_pem)
        assert list(window) == vector["window"], vector["id"]


def test_crls_in_every_encoding_found_in_the_wild(vectors_dir: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = (vectors_dir / "sgx/dcapqvl-sample-fmspc-00A067110000" / files.ROOT_CA_CRL).read_bytes()
    pem = x509.load_der_x509_crl(der).public_bytes(Encoding.PEM)
    assert files.crl_der(der, files.ROOT_CA_CRL) == der
    assert files.crl_der(pem, files.ROOT_CA_CRL) == der
    assert files.crl_der(der.hex().encode() + b"\n", files.ROOT_CA_CRL) == der  # PCCS


def test_zone_less_timestamps_are_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = 1752919278  # 2025-07-19T10:01:18Z
    for zone in ("UTC", "America/New_York", "Asia/Kolkata"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        assert files.timestamp("2025-07-19T10:01:18Z") == expected
        assert files.timestamp("2025-07-19T10:01:18") == expected
        assert files.timestamp("2025-07-19T12:01:18+02:00") == expected
    monkeypatch.delenv("TZ")
    time.tzset()
    assert "TZ" not in os.environ
