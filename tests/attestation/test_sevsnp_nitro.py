"""The SEV-SNP and Nitro verifiers against real hardware evidence, and against every way of
tampering with it that a relay or a malicious host could try."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from blindfold.attestation import nitro, sevsnp
from blindfold.attestation.formats import snp as snp_format
from blindfold.errors import EvidenceError

SNP_IDS = ["sev-snp/virtee-milan", "sev-snp/gosevguest-milan"]
NITRO_IDS = [
    "nitro/evervault-2022-10-13-production-pcrs",
    "nitro/evervault-2022-10-12-debug-userdata",
    "nitro/evervault-2023-09-18-debug-nonce",
]
SNP_DEBUG = {"sev-snp/virtee-milan": False, "sev-snp/gosevguest-milan": True}
NITRO_DEBUG = {
    "nitro/evervault-2022-10-13-production-pcrs": False,
    "nitro/evervault-2022-10-12-debug-userdata": True,
    "nitro/evervault-2023-09-18-debug-nonce": True,
}


def _vector(manifest: list[dict[str, Any]], vector_id: str) -> dict[str, Any]:
    return next(v for v in manifest if v["id"] == vector_id)


def _flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


# --- SEV-SNP ---


class Snp:
    def __init__(self, vectors_dir: Path, manifest: list[dict[str, Any]], vector_id: str):
        self.vector = _vector(manifest, vector_id)
        folder = vectors_dir / self.vector["dir"]
        self.report = (folder / "report.bin").read_bytes()
        self.collateral = {
            "vcek.der": (folder / "vcek.der").read_bytes(),
            "ask_ark.pem": (folder / "ask_ark.pem").read_bytes(),
        }
        self.at: int = self.vector["verify_at"]
        self.window: list[int] = self.vector["window"]

    def verify(
        self,
        report: bytes | None = None,
        collateral: dict[str, bytes] | None = None,
        at: int | None = None,
        **kwargs: Any,
    ) -> Any:
        return sevsnp.verify(
            self.report if report is None else report,
            self.collateral if collateral is None else collateral,
            self.at if at is None else at,
            **kwargs,
        )


@pytest.fixture(params=SNP_IDS)
def snp(
    request: pytest.FixtureRequest, vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> Snp:
    return Snp(vectors_dir, vector_manifest, request.param)


def test_snp_vector_verifies_to_manifest(snp: Snp) -> None:
    verdict = snp.verify()
    expected = snp.vector["measurements"]
    assert snp.vector["expected"]["accept"] is True
    assert verdict.kind == "sev-snp"
    assert verdict.report_data.hex() == expected["report_data"]
    for key in (
        "measurement",
        "host_data",
        "chip_id",
        "family_id",
        "image_id",
        "id_key_digest",
        "author_key_digest",
        "report_id",
    ):
        assert verdict.measurements[key] == expected[key], key
    tcb = bytes.fromhex(expected["reported_tcb"])
    assert verdict.measurements["reported_tcb_bootloader"] == tcb[0]
    assert verdict.measurements["reported_tcb_tee"] == tcb[1]
    assert verdict.measurements["reported_tcb_snp"] == tcb[6]
    assert verdict.measurements["reported_tcb_microcode"] == tcb[7]
    assert verdict.measurements["policy"] == int(snp.vector["policy"], 16)
    assert verdict.measurements["vmpl"] == snp.vector["vmpl"]
    assert verdict.measurements["guest_svn"] == snp.vector["guest_svn"]
    assert verdict.measurements["version"] == snp.vector["report_version"]
    assert verdict.debug is SNP_DEBUG[snp.vector["id"]]
    assert verdict.tcb_status is None
    assert [verdict.valid_from, verdict.valid_until] == snp.window


def test_snp_bundled_roots_are_used_without_ask_ark(snp: Snp) -> None:
    verdict = snp.verify(collateral={"vcek.der": snp.collateral["vcek.der"]})
    assert verdict.measurements["measurement"] == snp.vector["measurements"]["measurement"]


def test_snp_vcek_pem_is_accepted(snp: Snp) -> None:
    import warnings

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD VCEKs carry serial number 0
        cert = x509.load_der_x509_certificate(snp.collateral["vcek.der"])
    pem = cert.public_bytes(serialization.Encoding.PEM)
    snp.verify(collateral={"vcek.der": pem})


@pytest.mark.parametrize(
    ("field", "offset"),
    [
        ("report_data", 0x50 + 7),
        ("measurement", 0x90 + 3),
        ("host_data", 0xC0),
        ("policy", 0x08 + 2),
        ("signature R", 0x2A0 + 5),
        ("signature S", 0x2E8 + 5),
    ],
)
def test_snp_one_flipped_bit_is_rejected(snp: Snp, field: str, offset: int) -> None:
    with pytest.raises(EvidenceError, match="signature"):
        snp.verify(report=_flip(snp.report, offset))


def test_snp_flipped_chip_id_is_rejected(snp: Snp) -> None:
    with pytest.raises(EvidenceError, match="another chip"):
        snp.verify(report=_flip(snp.report, 0x1A0))


def test_snp_collateral_of_another_vector_is_rejected(
    snp: Snp, vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    other_id = next(i for i in SNP_IDS if i != snp.vector["id"])
    other = Snp(vectors_dir, vector_manifest, other_id)
    with pytest.raises(EvidenceError, match="VCEK is for another chip"):
        snp.verify(collateral=other.collateral)
    with pytest.raises(EvidenceError, match="VCEK is for another chip"):
        snp.verify(collateral={"vcek.der": other.collateral["vcek.der"]})


def test_snp_outside_validity_window_is_rejected(snp: Snp) -> None:
    snp.verify(at=snp.window[0])
    snp.verify(at=snp.window[1])
    with pytest.raises(EvidenceError, match="not valid at"):
        snp.verify(at=snp.window[1] + 1)
    with pytest.raises(EvidenceError, match="not valid at"):
        snp.verify(at=snp.window[0] - 1)


def test_snp_truncated_report_is_rejected(snp: Snp) -> None:
    with pytest.raises(EvidenceError, match="truncated: expected 1184 bytes, found 600"):
        snp.verify(report=snp.report[:600])
    with pytest.raises(EvidenceError, match="trailing data"):
        snp.verify(report=snp.report + b"\0")


def test_snp_garbage_is_rejected(snp: Snp) -> None:
    with pytest.raises(EvidenceError, match="truncated"):
        snp.verify(report=b"not a report")
    with pytest.raises(EvidenceError, match="SIGNATURE_ALGO: expected 1"):
        snp.verify(report=bytes(range(256)) * 4 + bytes(160))
    with pytest.raises(EvidenceError, match="version"):
        snp.verify(report=bytes(1184))


def test_snp_vcek_from_cache_dir(snp: Snp, tmp_path: Path) -> None:
    chip_id = snp.vector["measurements"]["chip_id"]
    tcb = bytes.fromhex(snp.vector["measurements"]["reported_tcb"])
    name = f"{chip_id}-{tcb[0]}-{tcb[1]}-{tcb[6]}-{tcb[7]}.der"
    report = snp_format.parse_report(snp.report)
    assert snp_format.vcek_cache_name(report.chip_id, report.reported_tcb) == name
    (tmp_path / name).write_bytes(snp.collateral["vcek.der"])
    verdict = snp.verify(collateral={}, vcek_cache_dir=tmp_path)
    assert verdict.measurements["chip_id"] == chip_id


def test_snp_missing_vcek_says_what_to_do(snp: Snp, tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match=r"no VCEK.*vcek_cache_dir"):
        snp.verify(collateral={})
    with pytest.raises(EvidenceError, match="KDS"):
        snp.verify(collateral={}, vcek_cache_dir=tmp_path)


def test_snp_cached_vcek_for_another_chip_is_rejected(
    snp: Snp, tmp_path: Path, vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    other = Snp(vectors_dir, vector_manifest, next(i for i in SNP_IDS if i != snp.vector["id"]))
    report = snp_format.parse_report(snp.report)
    name = snp_format.vcek_cache_name(report.chip_id, report.reported_tcb)
    (tmp_path / name).write_bytes(other.collateral["vcek.der"])
    with pytest.raises(EvidenceError, match="another chip"):
        snp.verify(collateral={}, vcek_cache_dir=tmp_path)


def test_snp_foreign_ark_is_rejected(snp: Snp) -> None:
    genoa = (sevsnp.ROOTS_DIR / "amd_genoa_ask_ark.pem").read_bytes()
    with pytest.raises(EvidenceError, match="ARK"):
        snp.verify(collateral={**snp.collateral, "ask_ark.pem": genoa})


def test_snp_garbage_vcek_is_rejected(snp: Snp) -> None:
    with pytest.raises(EvidenceError, match=r"not a valid X.509"):
        snp.verify(collateral={"vcek.der": b"garbage"})


def test_bundled_amd_roots_are_self_signed() -> None:
    for product in ("Milan", "Genoa"):
        ask, ark = sevsnp.bundled_ask_ark(product)
        assert ark.subject.rfc4514_string().startswith(f"CN=ARK-{product}")
        assert ask.subject.rfc4514_string().startswith(f"CN=SEV-{product}")
        sevsnp._check_pss_signed(ark, ark, "ARK")
        sevsnp._check_pss_signed(ask, ark, "ASK")


# --- Nitro ---


class Nitro:
    def __init__(self, vectors_dir: Path, manifest: list[dict[str, Any]], vector_id: str):
        self.vector = _vector(manifest, vector_id)
        self.doc = (vectors_dir / self.vector["dir"] / "attestation_doc.cbor").read_bytes()
        self.at: int = self.vector["verify_at"]
        self.window: list[int] = self.vector["window"]

    def verify(self, doc: bytes | None = None, at: int | None = None) -> Any:
        return nitro.verify(self.doc if doc is None else doc, {}, self.at if at is None else at)

    def rebuild(
        self,
        change: Callable[[dict[str, Any]], None] | None = None,
        signature: Callable[[bytes], bytes] | None = None,
    ) -> bytes:
        """Re-encodes the document after changing its payload or signature."""
        cose = cbor2.loads(self.doc)
        cose = cose.value if isinstance(cose, cbor2.CBORTag) else cose
        payload = cbor2.loads(cose[2])
        if change is not None:
            change(payload)
        cose[2] = cbor2.dumps(payload)
        if signature is not None:
            cose[3] = signature(cose[3])
        return cbor2.dumps(cose)

    def payload(self) -> dict[str, Any]:
        cose = cbor2.loads(self.doc)
        payload: dict[str, Any] = cbor2.loads(cose[2])
        return payload


@pytest.fixture(params=NITRO_IDS)
def doc(
    request: pytest.FixtureRequest, vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> Nitro:
    return Nitro(vectors_dir, vector_manifest, request.param)


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def test_nitro_vector_verifies_to_manifest(doc: Nitro) -> None:
    verdict = doc.verify()
    vector = doc.vector
    assert vector["expected"]["accept"] is True
    assert verdict.kind == "nitro"
    expected_pcrs = {f"pcr{i}": v for i, v in vector["measurements"]["pcrs"].items() if int(i) <= 8}
    assert {k: v for k, v in verdict.measurements.items() if k.startswith("pcr")} == expected_pcrs
    assert verdict.measurements["module_id"] == vector["module_id"]
    assert verdict.debug is NITRO_DEBUG[vector["id"]] is vector["debug_mode"]
    assert verdict.report_data == bytes.fromhex(vector["user_data"] or "")
    assert _hex_or_none(verdict.nonce) == vector["nonce"]
    assert _hex_or_none(verdict.public_key) == vector["public_key"]
    assert [verdict.valid_from, verdict.valid_until] == doc.window


def test_nitro_reencoding_is_faithful(doc: Nitro) -> None:
    # The tamper tests below re-encode the document; unchanged, that must still verify.
    assert doc.rebuild() == doc.doc
    doc.verify(doc=cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(doc.doc))))  # tagged form


def _flip_field(name: str) -> Callable[[dict[str, Any]], None]:
    def change(payload: dict[str, Any]) -> None:
        payload[name] = _flip(payload[name] or b"\0", 0)

    return change


def _flip_pcr(index: int) -> Callable[[dict[str, Any]], None]:
    def change(payload: dict[str, Any]) -> None:
        payload["pcrs"][index] = _flip(payload["pcrs"][index], 5)

    return change


@pytest.mark.parametrize(
    "change",
    [
        _flip_field("user_data"),
        _flip_field("nonce"),
        _flip_field("public_key"),
        _flip_pcr(0),
        _flip_pcr(4),
    ],
    ids=["user_data", "nonce", "public_key", "pcr0", "pcr4"],
)
def test_nitro_one_flipped_bit_is_rejected(doc: Nitro, change: Any) -> None:
    with pytest.raises(EvidenceError, match="COSE signature does not verify"):
        doc.verify(doc=doc.rebuild(change))


def test_nitro_flipped_signature_is_rejected(doc: Nitro) -> None:
    with pytest.raises(EvidenceError, match="COSE signature does not verify"):
        doc.verify(doc=doc.rebuild(signature=lambda s: _flip(s, 10)))
    with pytest.raises(EvidenceError, match="expected 96 bytes"):
        doc.verify(doc=doc.rebuild(signature=lambda s: s[:-1]))


def test_nitro_certificates_of_another_vector_are_rejected(
    doc: Nitro, vectors_dir: Path, vector_manifest: list[dict[str, Any]]
) -> None:
    other = Nitro(vectors_dir, vector_manifest, next(i for i in NITRO_IDS if i != doc.vector["id"]))
    theirs = other.payload()

    def swap(payload: dict[str, Any]) -> None:
        payload["certificate"] = theirs["certificate"]
        payload["cabundle"] = theirs["cabundle"]

    with pytest.raises(EvidenceError, match="COSE signature does not verify"):
        doc.verify(doc=doc.rebuild(swap), at=other.at)


def test_nitro_foreign_root_is_rejected(doc: Nitro) -> None:
    def drop_root(payload: dict[str, Any]) -> None:
        payload["cabundle"] = payload["cabundle"][1:]

    with pytest.raises(EvidenceError, match="not the AWS Nitro Enclaves Root G1"):
        doc.verify(doc=doc.rebuild(drop_root))


def test_nitro_broken_chain_is_rejected(doc: Nitro) -> None:
    def drop_intermediate(payload: dict[str, Any]) -> None:
        del payload["cabundle"][1]

    with pytest.raises(EvidenceError, match="is not signed by"):
        doc.verify(doc=doc.rebuild(drop_intermediate))


def test_nitro_outside_validity_window_is_rejected(doc: Nitro) -> None:
    doc.verify(at=doc.window[0])
    doc.verify(at=doc.window[1])
    with pytest.raises(EvidenceError, match="not valid at"):
        doc.verify(at=doc.window[1] + 1)
    with pytest.raises(EvidenceError, match="not valid at"):
        doc.verify(at=doc.window[0] - 1)


def test_nitro_truncated_document_is_rejected(doc: Nitro) -> None:
    with pytest.raises(EvidenceError, match=r"not valid CBOR.*truncated"):
        doc.verify(doc=doc.doc[: len(doc.doc) // 2])
    with pytest.raises(EvidenceError, match="not valid CBOR"):
        doc.verify(doc=doc.doc[:-1])


def test_nitro_garbage_is_rejected() -> None:
    with pytest.raises(EvidenceError, match="empty"):
        nitro.verify(b"", {}, 0)
    with pytest.raises(EvidenceError, match="not valid CBOR"):
        nitro.verify(b"\xff\x00garbage", {}, 0)
    with pytest.raises(EvidenceError, match="expected a COSE_Sign1 array"):
        nitro.verify(cbor2.dumps({"hello": "world"}), {}, 0)
    with pytest.raises(EvidenceError, match="expected COSE_Sign1"):
        nitro.verify(cbor2.dumps(cbor2.CBORTag(17, [b"", {}, b"", b""])), {}, 0)


def test_nitro_wrong_algorithm_is_rejected(doc: Nitro) -> None:
    cose = cbor2.loads(doc.doc)
    cose[0] = cbor2.dumps({1: -7})  # ES256
    with pytest.raises(EvidenceError, match="expected -35 \\(ES384\\), found -7"):
        doc.verify(doc=cbor2.dumps(cose))


def test_nitro_missing_field_is_rejected(doc: Nitro) -> None:
    def drop(payload: dict[str, Any]) -> None:
        del payload["certificate"]

    with pytest.raises(EvidenceError, match="no 'certificate' field"):
        doc.verify(doc=doc.rebuild(drop))


def test_snp_ask_ark_with_one_certificate_is_rejected(snp: Snp) -> None:
    only_vcek = {**snp.collateral, "ask_ark.pem": snp.collateral["vcek.der"]}
    with pytest.raises(EvidenceError, match=r"collateral 'ask_ark.pem': expected 2 certificates"):
        snp.verify(collateral=only_vcek)
