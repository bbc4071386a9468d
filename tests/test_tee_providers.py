"""Hardware TEE providers against fake device trees that serve real attestation vectors.

The kernel / Gramine / Intel PCS are played at the file- and HTTP-protocol level only: the
providers' own parsing, collateral assembly, caching and race handling run unmodified.
"""

from __future__ import annotations

import json
import struct
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import cbor2
import pytest

from blindfold.attestation.formats import collateral_files, dcap, snp
from blindfold.errors import ConfigurationError, EvidenceError
from blindfold.server.tee import nitro_nsm, sev_guest
from blindfold.server.tee.configfs_tsm import ConfigfsTsmProvider, RealFilesystem
from blindfold.server.tee.detect import TeePaths, detect_tee, make_hardware_provider
from blindfold.server.tee.errors import TeeUnavailable
from blindfold.server.tee.gramine import GramineSgxProvider, derive_sealing_key
from blindfold.server.tee.gramine_manifest import render_manifest
from blindfold.server.tee.pcs import INTEL_ROOT_CA_CRL_URL

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SGX_VECTOR = "sgx/dcapqvl-sample-fmspc-00A067110000"
TDX_VECTOR = "tdx/dcapqvl-sample-fmspc-B0C06F000000"


def vector_meta(vectors_dir: Path, vector_id: str) -> dict[str, Any]:
    manifest = json.loads((vectors_dir / "manifest.json").read_text())
    return next(v for v in manifest["vectors"] if v["id"] == vector_id)


# --- a fake Intel PCS serving a vector's files ---------------------------------------------


class FakePcs:
    """Serves a vector folder the way Intel PCS v4 does: bodies plus URL-encoded issuer
    chains in response headers."""

    def __init__(self, folder: Path, base: str = "https://pcs.test") -> None:
        self.folder = folder
        self.base = base
        self.urls: list[str] = []

    def _chain(self, name: str) -> str:
        return urllib.parse.quote((self.folder / name).read_text())

    def __call__(self, url: str) -> tuple[bytes, dict[str, str]]:
        self.urls.append(url)
        parsed = urllib.parse.urlparse(url)
        query = urllib.parse.parse_qs(parsed.query)

        def read(name: str) -> bytes:
            return (self.folder / name).read_bytes()

        if url == INTEL_ROOT_CA_CRL_URL or parsed.path.endswith("/rootcacrl"):
            return read("root_ca_crl.der"), {}
        if parsed.path.endswith("/certification/v4/tcb"):
            assert query["fmspc"] == [self.expected_fmspc]
            return read("tcb_info.json"), {
                "TCB-Info-Issuer-Chain": self._chain("tcb_info_issuer_chain.pem")
            }
        if parsed.path.endswith("/certification/v4/qe/identity"):
            return read("qe_identity.json"), {
                "SGX-Enclave-Identity-Issuer-Chain": self._chain("qe_identity_issuer_chain.pem")
            }
        if parsed.path.endswith("/sgx/certification/v4/pckcrl"):
            assert query["ca"] == [self.expected_ca] and query["encoding"] == ["der"]
            return read("pck_crl.der"), {
                "SGX-PCK-CRL-Issuer-Chain": self._chain("pck_crl_issuer_chain.pem")
            }
        raise AssertionError(f"unexpected PCS URL {url}")

    expected_fmspc = ""
    expected_ca = ""


def fake_pcs(vectors_dir: Path, vector_id: str) -> FakePcs:
    meta = vector_meta(vectors_dir, vector_id)
    pcs = FakePcs(vectors_dir / meta["dir"])
    pcs.expected_fmspc = meta["fmspc"]
    pcs.expected_ca = meta["pck_ca"]
    return pcs


def assert_collateral_is_vector(collateral: dict[str, bytes], folder: Path) -> None:
    for name in collateral_files.PCS_FILES:
        assert collateral[name] == (folder / name).read_bytes(), name
    assert json.loads(collateral[collateral_files.DCAP_QVL_JSON]) == json.loads(
        (folder / "collateral.dcap-qvl.json").read_bytes()
    )


# --- Gramine SGX ---------------------------------------------------------------------------


@pytest.fixture
def gramine_root(tmp_path: Path, vectors_dir: Path) -> Path:
    root = tmp_path / "attestation"
    (root / "keys").mkdir(parents=True)
    (root / "attestation_type").write_text("dcap")
    (root / "user_report_data").write_bytes(bytes(64))
    (root / "quote").write_bytes((vectors_dir / SGX_VECTOR / "quote.bin").read_bytes())
    (root / "keys" / "_sgx_mrenclave").write_bytes(bytes(range(16)))
    return root


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_gramine_evidence_has_quote_and_vector_collateral(
    gramine_root: Path, vectors_dir: Path, tmp_path: Path
) -> None:
    meta = vector_meta(vectors_dir, SGX_VECTOR)
    pcs = fake_pcs(vectors_dir, SGX_VECTOR)
    provider = GramineSgxProvider(
        gramine_root, pcs.base, tmp_path / "cache", fetch=pcs, now=Clock(meta["verify_at"])
    )
    quote = (gramine_root / "quote").read_bytes()
    report_data = dcap.parse_quote(quote).report_data
    evidence = provider.evidence(report_data)
    assert evidence.kind == "sgx"
    assert evidence.evidence == quote
    assert (gramine_root / "user_report_data").read_bytes() == report_data
    assert_collateral_is_vector(evidence.collateral, vectors_dir / SGX_VECTOR)
    assert provider.collateral_valid_until() == meta["window"][1]
    # PCCS (not Intel) serves the root CA CRL itself.
    assert any(url.endswith("/sgx/certification/v4/rootcacrl") for url in pcs.urls)


def test_gramine_collateral_cached_then_refreshed_near_next_update(
    gramine_root: Path, vectors_dir: Path, tmp_path: Path
) -> None:
    meta = vector_meta(vectors_dir, SGX_VECTOR)
    valid_until = meta["window"][1]
    pcs = fake_pcs(vectors_dir, SGX_VECTOR)
    clock = Clock(meta["verify_at"])
    cache = tmp_path / "cache"
    provider = GramineSgxProvider(gramine_root, pcs.base, cache, fetch=pcs, now=clock)
    report_data = dcap.parse_quote((gramine_root / "quote").read_bytes()).report_data
    provider.evidence(report_data)
    fetched = len(pcs.urls)
    assert fetched == 4
    provider.evidence(report_data)
    assert len(pcs.urls) == fetched  # memory cache

    # A restarted server reads the disk cache instead of calling the PCS.
    restarted = GramineSgxProvider(gramine_root, pcs.base, cache, fetch=pcs, now=clock)
    assert_collateral_is_vector(restarted.evidence(report_data).collateral, pcs.folder)
    assert len(pcs.urls) == fetched

    clock.t = valid_until - 3600  # inside the one-day margin: refetch
    provider.evidence(report_data)
    assert len(pcs.urls) == 2 * fetched
    # The PCS still serves the same (now expiring) collateral: no hammering.
    provider.evidence(report_data)
    assert len(pcs.urls) == 2 * fetched


def test_gramine_intel_pcs_root_crl_from_distribution_point(
    gramine_root: Path, vectors_dir: Path
) -> None:
    pcs = fake_pcs(vectors_dir, SGX_VECTOR)
    provider = GramineSgxProvider(gramine_root, fetch=pcs)
    provider.evidence(dcap.parse_quote((gramine_root / "quote").read_bytes()).report_data)
    assert INTEL_ROOT_CA_CRL_URL in pcs.urls
    assert all(
        u.startswith("https://api.trustedservices.intel.com/")
        for u in pcs.urls
        if u != INTEL_ROOT_CA_CRL_URL
    )


def test_gramine_rejects_quote_for_other_report_data(gramine_root: Path, vectors_dir: Path) -> None:
    pcs = fake_pcs(vectors_dir, SGX_VECTOR)
    provider = GramineSgxProvider(gramine_root, fetch=pcs)
    with pytest.raises(TeeUnavailable, match="does not carry the report data"):
        provider.evidence(b"\x01" * 64)


def test_gramine_sealing_key(gramine_root: Path) -> None:
    provider = GramineSgxProvider(gramine_root)
    key = provider.sealing_key()
    assert key == derive_sealing_key(bytes(range(16)))
    assert key is not None and len(key) == 32 and key != bytes(range(16)) + bytes(16)


def test_gramine_missing_root_and_wrong_type(tmp_path: Path, gramine_root: Path) -> None:
    with pytest.raises(ConfigurationError, match="not running inside a Gramine SGX enclave"):
        GramineSgxProvider(tmp_path / "nope")
    (gramine_root / "attestation_type").write_text("none")
    with pytest.raises(ConfigurationError, match='remote_attestation = "dcap"'):
        GramineSgxProvider(gramine_root)


# --- configfs-tsm with a fake kernel at the file-protocol level ----------------------------


class FakeKernelFs(RealFilesystem):
    """Plays the kernel's part of configfs-tsm over a tmp directory: mkdir creates the
    attribute files, an inblob write bumps generation and produces outblob/auxblob."""

    def __init__(self, provider: str, outblob: bytes, auxblob: bytes | None = None) -> None:
        self.provider = provider
        self.outblob = outblob
        self.auxblob = auxblob
        self.races = 0  # how many attempts see a concurrent inblob write
        self.inblobs: list[bytes] = []

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        (path / "generation").write_text("0\n")
        (path / "provider").write_text(self.provider + "\n")
        (path / "inblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")
        if self.auxblob is not None:
            (path / "auxblob").write_bytes(b"")

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        if path.name == "inblob":
            self.inblobs.append(data)
            self._bump(path.parent)
            (path.parent / "outblob").write_bytes(self.outblob)
            if self.auxblob is not None:
                (path.parent / "auxblob").write_bytes(self.auxblob)

    def read(self, path: Path) -> bytes:
        if path.name == "outblob" and self.races > 0:
            # Another process writes inblob between our write and our read.
            self.races -= 1
            self._bump(path.parent)
        return super().read(path)

    @staticmethod
    def _bump(entry: Path) -> None:
        generation = entry / "generation"
        generation.write_text(f"{int(generation.read_text()) + 1}\n")


@pytest.fixture
def tdx_quote(vectors_dir: Path) -> bytes:
    return (vectors_dir / TDX_VECTOR / "quote.bin").read_bytes()


def tdx_provider(
    root: Path, fs: FakeKernelFs, vectors_dir: Path, **kw: object
) -> ConfigfsTsmProvider:
    meta = vector_meta(vectors_dir, TDX_VECTOR)
    pcs = fake_pcs(vectors_dir, TDX_VECTOR)
    return ConfigfsTsmProvider(
        "tdx",
        root,
        pccs_url=pcs.base,
        fetch=pcs,
        fs=fs,
        now=Clock(meta["verify_at"]),
        **kw,  # type: ignore[arg-type]
    )


def test_configfs_tdx_returns_real_quote_with_collateral(
    tmp_path: Path, vectors_dir: Path, tdx_quote: bytes
) -> None:
    fs = FakeKernelFs("tdx_guest", tdx_quote)
    provider = tdx_provider(tmp_path, fs, vectors_dir)
    report_data = dcap.parse_quote(tdx_quote).report_data
    evidence = provider.evidence(report_data)
    assert evidence.kind == "tdx" and evidence.evidence == tdx_quote
    assert fs.inblobs == [report_data]
    assert_collateral_is_vector(evidence.collateral, vectors_dir / TDX_VECTOR)
    assert provider.collateral_valid_until() == vector_meta(vectors_dir, TDX_VECTOR)["window"][1]
    assert provider.sealing_key() is None
    assert list(tmp_path.iterdir()) == []  # the entry was removed


def test_configfs_generation_race_is_retried(
    tmp_path: Path, vectors_dir: Path, tdx_quote: bytes
) -> None:
    fs = FakeKernelFs("tdx_guest", tdx_quote)
    fs.races = 2
    provider = tdx_provider(tmp_path, fs, vectors_dir, max_attempts=3)
    evidence = provider.evidence(dcap.parse_quote(tdx_quote).report_data)
    assert evidence.evidence == tdx_quote
    assert len(fs.inblobs) == 3
    assert list(tmp_path.iterdir()) == []


def test_configfs_persistent_generation_race_is_a_clear_error(
    tmp_path: Path, vectors_dir: Path, tdx_quote: bytes
) -> None:
    fs = FakeKernelFs("tdx_guest", tdx_quote)
    fs.races = 100
    provider = tdx_provider(tmp_path, fs, vectors_dir, max_attempts=3)
    with pytest.raises(TeeUnavailable, match="another process in each of 3 attempts"):
        provider.evidence(dcap.parse_quote(tdx_quote).report_data)
    assert len(fs.inblobs) == 3
    assert list(tmp_path.iterdir()) == []


def test_configfs_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"configfs-tsm not found at .*Linux >= 6.7"):
        ConfigfsTsmProvider("tdx", tmp_path / "missing")


def test_configfs_wrong_provider(tmp_path: Path, vectors_dir: Path, tdx_quote: bytes) -> None:
    provider = tdx_provider(tmp_path, FakeKernelFs("sev_guest", tdx_quote), vectors_dir)
    with pytest.raises(TeeUnavailable, match="provider is 'sev_guest', expected 'tdx_guest'"):
        provider.evidence(dcap.parse_quote(tdx_quote).report_data)


def cert_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    header_len = (len(entries) + 1) * 24
    table, body = b"", b""
    for guid, der in entries:
        table += struct.pack("<16sII", guid.bytes, header_len + len(body), len(der))
        body += der
    return table + bytes(24) + body


def test_configfs_sev_snp_report_and_certificates(tmp_path: Path, vectors_dir: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    folder = vectors_dir / "sev-snp" / "virtee-milan"
    report = (folder / "report.bin").read_bytes()
    vcek = (folder / "vcek.der").read_bytes()
    ask, ark = x509.load_pem_x509_certificates((folder / "ask_ark.pem").read_bytes())
    aux = cert_table(
        [
            (snp.GUID_ARK, ark.public_bytes(Encoding.DER)),
            (snp.GUID_VCEK, vcek),
            (snp.GUID_ASK, ask.public_bytes(Encoding.DER)),
        ]
    )
    fs = FakeKernelFs("sev_guest", report, aux)
    provider = ConfigfsTsmProvider(
        "sev-snp", tmp_path, fs=fs, sev_guest_device=tmp_path / "no-sev-guest"
    )
    evidence = provider.evidence(report[0x50:0x90])
    assert evidence.kind == "sev-snp" and evidence.evidence == report
    assert evidence.collateral["vcek.der"] == vcek
    chain = x509.load_pem_x509_certificates(evidence.collateral["ask_ark.pem"])
    assert chain == [ask, ark]
    assert provider.sealing_key() is None
    assert provider.collateral_valid_until() is None


def as_quote_v5(quote_v4: bytes) -> bytes:
    """The same TD report framed as a DCAP quote v5 (TDX 1.5 framing): version 5 and a
    (u16 body type, u32 body size) prefix before the body."""
    body_end = 48 + 584
    return (
        struct.pack("<H", 5)
        + quote_v4[2:48]
        + struct.pack("<HI", 2, 584)
        + quote_v4[48:body_end]
        + quote_v4[body_end:]
    )


def test_attack_server_refuses_a_v5_quote_every_client_refuses(
    tmp_path: Path, vectors_dir: Path, tdx_quote: bytes
) -> None:
    # The server used to publish v5 quotes that clients then refuse; both sides now read
    # quotes with attestation.formats.dcap, so the server fails with the reason instead.
    v5 = as_quote_v5(tdx_quote)
    with pytest.raises(EvidenceError, match="version 5"):
        dcap.parse_quote(v5)
    provider = tdx_provider(tmp_path, FakeKernelFs("tdx_guest", v5), vectors_dir)
    with pytest.raises(TeeUnavailable, match=r"quote that clients refuse.*version 5"):
        provider.evidence(dcap.parse_quote(tdx_quote).report_data)


def test_attack_server_refuses_an_snp_report_with_trailing_bytes(
    tmp_path: Path, vectors_dir: Path
) -> None:
    # Bytes after the 1184-byte report are not signed; clients refuse them, so must the server.
    report = (vectors_dir / "sev-snp" / "virtee-milan" / "report.bin").read_bytes()
    fs = FakeKernelFs("sev_guest", report + b"unsigned", cert_table([]))
    provider = ConfigfsTsmProvider(
        "sev-snp", tmp_path, fs=fs, sev_guest_device=tmp_path / "no-sev-guest"
    )
    with pytest.raises(TeeUnavailable, match=r"report clients refuse.*trailing data"):
        provider.evidence(report[0x50:0x90])


# --- /dev/sev-guest and /dev/nsm: packing and parsing only -------------------------------


def test_sev_guest_ioctl_numbers_and_request_packing() -> None:
    assert sev_guest.SNP_GET_REPORT == 0xC0205300
    assert sev_guest.SNP_GET_DERIVED_KEY == 0xC0205301
    assert sev_guest.SNP_GET_EXT_REPORT == 0xC0205302
    req = sev_guest.pack_report_req(b"\xaa" * 64, vmpl=2)
    assert len(req) == 96 and req[:64] == b"\xaa" * 64 and req[64:68] == b"\x02\0\0\0"
    assert req[68:] == bytes(28)
    ext = sev_guest.pack_ext_report_req(b"\xaa" * 64, 0x1000, 0x4000)
    assert len(ext) == 112 and ext[:96] == sev_guest.pack_report_req(b"\xaa" * 64)
    assert sev_guest.unpack_ext_report_certs_len(ext) == 0x4000
    key_req = sev_guest.pack_derived_key_req()
    assert len(key_req) == 32
    root_sel, _rsvd, fields, vmpl, svn, tcb = struct.unpack("<IIQIIQ", key_req)
    assert root_sel == 0 and vmpl == 0 and svn == 0 and tcb == 0
    assert fields & sev_guest.FIELD_MEASUREMENT and fields & sev_guest.FIELD_GUEST_POLICY
    ioctl_arg = sev_guest.pack_guest_request(0x1111, 0x2222)
    assert ioctl_arg == struct.pack("<B7xQQQ", 1, 0x1111, 0x2222, 0)
    written_back = ioctl_arg[:24] + struct.pack("<II", 0x16, 1)
    assert sev_guest.unpack_guest_request_errors(written_back) == (0x16, 1)


def test_sev_guest_response_parsing(vectors_dir: Path) -> None:
    report = (vectors_dir / "sev-snp" / "virtee-milan" / "report.bin").read_bytes()[:1184]
    resp = struct.pack("<II24x", 0, 1184) + report
    resp += bytes(4000 - len(resp))
    assert sev_guest.parse_report_resp(resp) == report
    with pytest.raises(TeeUnavailable, match="status 0x16"):
        sev_guest.parse_report_resp(struct.pack("<II", 0x16, 0) + bytes(3992))
    key = bytes(range(32))
    assert sev_guest.parse_derived_key_resp(struct.pack("<I28x", 0) + key) == key
    with pytest.raises(TeeUnavailable, match="refused the key derivation"):
        sev_guest.parse_derived_key_resp(struct.pack("<I28x", 0x16) + key)


def test_sev_guest_cert_table_parsing() -> None:
    blob = cert_table([(snp.GUID_VCEK, b"vcek"), (snp.GUID_ASK, b"ask")])
    assert sev_guest.parse_cert_table(blob + bytes(4096)) == {"vcek": b"vcek", "ask": b"ask"}
    le_guid = struct.pack("<16sII", snp.GUID_VCEK.bytes_le, 48, 4) + bytes(24) + b"vcek"
    assert sev_guest.parse_cert_table(le_guid) == {"vcek": b"vcek"}
    assert sev_guest.parse_cert_table(bytes(4096)) == {}
    with pytest.raises(TeeUnavailable, match="points past its blob"):
        sev_guest.parse_cert_table(struct.pack("<16sII", snp.GUID_VCEK.bytes, 40, 999))


def test_sev_guest_missing_device(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"not found.*modprobe sev-guest"):
        sev_guest.SevGuestProvider(tmp_path / "sev-guest")


def test_nitro_request_encoding_and_response_decoding(vectors_dir: Path) -> None:
    report_data = bytes(range(64))
    request = nitro_nsm.encode_attestation_request(report_data)
    assert cbor2.loads(request) == {
        "Attestation": {"user_data": report_data, "nonce": None, "public_key": None}
    }
    assert nitro_nsm.NSM_IOCTL_RAW == 0xC0200A00
    raw = nitro_nsm.pack_nsm_raw(1, 2, 3, 0x3000)
    assert len(raw) == 32 and nitro_nsm.unpack_response_len(raw) == 0x3000
    doc = (
        vectors_dir / "nitro" / "evervault-2022-10-13-production-pcrs" / "attestation_doc.cbor"
    ).read_bytes()
    response = cbor2.dumps({"Attestation": {"document": doc}})
    assert nitro_nsm.decode_attestation_response(response) == doc
    until = nitro_nsm.document_valid_until(doc)
    window = vector_meta(vectors_dir, "nitro/evervault-2022-10-13-production-pcrs")["window"]
    assert until is not None and window[0] < until <= window[1]
    with pytest.raises(TeeUnavailable, match="InvalidArgument"):
        nitro_nsm.decode_attestation_response(cbor2.dumps({"Error": "InvalidArgument"}))


def test_attack_server_refuses_a_nitro_document_clients_refuse(vectors_dir: Path) -> None:
    # The server used to read the leaf certificate out of any CBOR tag and publish the
    # document; clients accept only COSE_Sign1 (tag 18) or no tag.
    doc = (
        vectors_dir / "nitro" / "evervault-2022-10-13-production-pcrs" / "attestation_doc.cbor"
    ).read_bytes()
    retagged = cbor2.dumps(cbor2.CBORTag(17, cbor2.loads(doc)))
    with pytest.raises(TeeUnavailable, match=r"document clients refuse.*CBOR tag 17"):
        nitro_nsm.document_valid_until(retagged)


def test_nitro_missing_device(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not running inside an AWS Nitro Enclave"):
        nitro_nsm.NitroNsmProvider(tmp_path / "nsm")


# --- detection ---------------------------------------------------------------------------


def fake_paths(tmp_path: Path) -> TeePaths:
    return TeePaths(
        gramine_attestation=tmp_path / "dev" / "attestation",
        configfs_tsm=tmp_path / "configfs" / "tsm" / "report",
        tdx_guest=tmp_path / "dev" / "tdx_guest",
        sev_guest=tmp_path / "dev" / "sev-guest",
        nsm=tmp_path / "dev" / "nsm",
        cpuinfo=tmp_path / "cpuinfo",
    )


def test_detect_each_kind(tmp_path: Path) -> None:
    paths = fake_paths(tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "cpuinfo").write_text("processor: 0\nflags\t\t: fpu vme sse2\n")
    assert detect_tee(True, paths) == "simulation"
    with pytest.raises(ConfigurationError, match=r"no TEE found.*--tee simulation"):
        detect_tee(False, paths)
    paths.nsm.touch()
    assert detect_tee(False, paths) == "nitro"
    paths.sev_guest.touch()
    assert detect_tee(False, paths) == "sev-snp"
    paths.tdx_guest.touch()
    assert detect_tee(False, paths) == "tdx"
    paths.gramine_attestation.mkdir()
    (paths.gramine_attestation / "quote").touch()
    assert detect_tee(False, paths) == "sgx"


def test_detect_from_cpu_flags_and_configfs_provider(tmp_path: Path) -> None:
    paths = fake_paths(tmp_path)
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu tdx_guest\n")
    assert detect_tee(False, paths) == "tdx"
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu sev sev_es sev_snp\n")
    assert detect_tee(False, paths) == "sev-snp"
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu\n")
    # configfs-tsm on a real kernel creates `provider` in each new entry; a tmp directory
    # does not, so the probe finds nothing and detection falls through.
    paths.configfs_tsm.mkdir(parents=True)
    assert detect_tee(True, paths) == "simulation"
    assert list(paths.configfs_tsm.iterdir()) == []


def test_make_hardware_provider(tmp_path: Path, gramine_root: Path) -> None:
    assert make_hardware_provider("sgx", root=gramine_root).kind == "sgx"
    with pytest.raises(ConfigurationError, match="configfs-tsm not found"):
        make_hardware_provider("tdx", root=tmp_path / "none")
    with pytest.raises(ConfigurationError, match="sev-guest"):
        make_hardware_provider("sev-snp", root=tmp_path / "none", device=tmp_path / "sg")
    with pytest.raises(ConfigurationError, match="Nitro"):
        make_hardware_provider("nitro", device=tmp_path / "nsm")
    with pytest.raises(ConfigurationError, match="unknown hardware TEE kind 'tpm'"):
        make_hardware_provider("tpm")


# --- Gramine manifest --------------------------------------------------------------------


def test_manifest_template_renders_with_installed_paths() -> None:
    import onnxruntime

    import blindfold.server.tee as tee_pkg

    template = (PROJECT_ROOT / "deploy" / "gramine" / "blindfold.manifest.template").read_text()
    manifest = render_manifest(template)
    assert "{{" not in manifest and "}}" not in manifest
    blindfold_dir = Path(tee_pkg.__file__).resolve().parents[3]
    onnxruntime_dir = Path(onnxruntime.__file__).resolve().parents[1]
    assert f'"file:{blindfold_dir}/"' in manifest
    assert f'"file:{onnxruntime_dir}/"' in manifest
    assert 'sgx.remote_attestation = "dcap"' in manifest
    with pytest.raises(ConfigurationError, match="unknown placeholders"):
        render_manifest("x = {{ nope }}")
