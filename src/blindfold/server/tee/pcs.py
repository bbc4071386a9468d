"""Intel DCAP collateral for SGX and TDX quotes, fetched from Intel PCS or a local PCCS.

This module owns: finding the PCK certificate chain inside a quote (ECDSA quote v3, v4, v5),
reading its FMSPC and issuing CA, downloading TCB info, QE identity, PCK CRL and root CA CRL
with their issuer chains, and caching them (memory and disk) until shortly before their
nextUpdate. The server ships this collateral next to the quote so that clients can verify
offline, without talking to Intel.

The HTTP client is an injectable callable `fetch(url) -> (body, headers)` so that tests can
serve real Intel collateral from the attestation vector store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
import struct
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from blindfold.server.tee.errors import CollateralUnavailable, TeeUnavailable

log = logging.getLogger(__name__)

Fetch = Callable[[str], tuple[bytes, dict[str, str]]]

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
# Intel PCS has no rootcacrl endpoint; the root CA's CRL distribution point serves it.
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"

# The collateral files, named as in the attestation vector store (and Evidence.collateral).
COLLATERAL_FILES = (
    "tcb_info.json",
    "tcb_info_issuer_chain.pem",
    "qe_identity.json",
    "qe_identity_issuer_chain.pem",
    "pck_crl.der",
    "pck_crl_issuer_chain.pem",
    "root_ca_crl.der",
)
DCAP_QVL_FILE = "collateral.dcap-qvl.json"

_SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_FMSPC_OID = "1.2.840.113741.1.13.1.4"
_TEE_TYPE_SGX = 0x00000000
_TEE_TYPE_TDX = 0x00000081
_QUOTE_HEADER_LEN = 48
_SGX_REPORT_BODY_LEN = 384
_TDX10_REPORT_BODY_LEN = 584
_TDX15_REPORT_BODY_LEN = 648
_CERT_TYPE_PCK_CHAIN = 5
_CERT_TYPE_QE_REPORT = 6
_REPORT_DATA_OFFSET_SGX = 320  # within an SGX report body
_REPORT_DATA_OFFSET_TDX = 520  # within a TD report body (1.0 and 1.5)


def urllib_fetch(url: str, timeout: float = 30.0) -> tuple[bytes, dict[str, str]]:
    """The default fetch: one HTTPS GET with the system trust store."""
    request = urllib.request.Request(url, headers={"Accept": "*/*"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (https)
        return response.read(), {k: v for k, v in response.headers.items()}


# --- quote parsing ---------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteLayout:
    """Where the interesting parts of a DCAP quote are."""

    version: int
    tee_type: int
    body_offset: int
    body_len: int
    signature_offset: int
    signature_len: int

    @property
    def report_data_offset(self) -> int:
        inner = (
            _REPORT_DATA_OFFSET_TDX if self.tee_type == _TEE_TYPE_TDX else _REPORT_DATA_OFFSET_SGX
        )
        return self.body_offset + inner


def _bad_quote(what: str) -> TeeUnavailable:
    return TeeUnavailable(
        f"the TEE returned a quote that is not a DCAP ECDSA quote v3/v4/v5 ({what}); check the "
        "quoting enclave / QGS installation on this host"
    )


def quote_layout(quote: bytes) -> QuoteLayout:
    """Parses the header to locate the report body and the signature data."""
    if len(quote) < _QUOTE_HEADER_LEN + 4:
        raise _bad_quote(f"only {len(quote)} bytes")
    version, _key_type, tee_type = struct.unpack_from("<HHI", quote, 0)
    if version == 3:
        body_offset, body_len = _QUOTE_HEADER_LEN, _SGX_REPORT_BODY_LEN
    elif version == 4:
        body_offset = _QUOTE_HEADER_LEN
        body_len = _TDX10_REPORT_BODY_LEN if tee_type == _TEE_TYPE_TDX else _SGX_REPORT_BODY_LEN
    elif version == 5:
        # v5 prefixes the body with (u16 body type, u32 body size).
        _body_type, body_len = struct.unpack_from("<HI", quote, _QUOTE_HEADER_LEN)
        body_offset = _QUOTE_HEADER_LEN + 6
    else:
        raise _bad_quote(f"version {version}")
    sig_len_offset = body_offset + body_len
    if len(quote) < sig_len_offset + 4:
        raise _bad_quote("truncated before the signature data")
    (signature_len,) = struct.unpack_from("<I", quote, sig_len_offset)
    signature_offset = sig_len_offset + 4
    if len(quote) < signature_offset + signature_len:
        raise _bad_quote("truncated signature data")
    return QuoteLayout(version, tee_type, body_offset, body_len, signature_offset, signature_len)


def report_data_of_quote(quote: bytes) -> bytes:
    """The 64 bytes of report data bound into an SGX or TDX quote."""
    layout = quote_layout(quote)
    start = layout.report_data_offset
    return quote[start : start + 64]


def _certification_data(data: bytes, offset: int) -> tuple[int, bytes]:
    if len(data) < offset + 6:
        raise _bad_quote("truncated certification data")
    cert_type, size = struct.unpack_from("<HI", data, offset)
    body = data[offset + 6 : offset + 6 + size]
    if len(body) != size:
        raise _bad_quote("truncated certification data")
    return cert_type, body


def _pck_chain_from_qe_report_data(data: bytes) -> bytes:
    # QE report (384) + QE report signature (64) + auth data (u16 size + data) + cert data.
    offset = _SGX_REPORT_BODY_LEN + 64
    if len(data) < offset + 2:
        raise _bad_quote("truncated QE report certification data")
    (auth_len,) = struct.unpack_from("<H", data, offset)
    cert_type, body = _certification_data(data, offset + 2 + auth_len)
    if cert_type != _CERT_TYPE_PCK_CHAIN:
        raise _bad_quote(f"QE certification data type {cert_type}, expected 5 (PCK chain)")
    return body


def pck_chain_pem_from_quote(quote: bytes) -> bytes:
    """The PEM PCK certificate chain (leaf, platform/processor CA, root) embedded in a quote."""
    layout = quote_layout(quote)
    sig = quote[layout.signature_offset : layout.signature_offset + layout.signature_len]
    if layout.version == 3:
        # ECDSA signature (64) + attestation key (64), then the QE report section directly.
        return _pck_chain_from_qe_report_data(sig[128:])
    cert_type, body = _certification_data(sig, 128)
    if cert_type == _CERT_TYPE_QE_REPORT:
        return _pck_chain_from_qe_report_data(body)
    if cert_type == _CERT_TYPE_PCK_CHAIN:
        return body
    raise _bad_quote(f"certification data type {cert_type}; the PCK chain is not embedded")


# --- PCK certificate -------------------------------------------------------------------


@dataclass(frozen=True)
class PckInfo:
    fmspc: str  # 12 upper-case hex digits, as PCS expects
    ca: str  # "processor" or "platform"


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """Splits concatenated DER TLVs into (tag, content); enough for the SGX extension."""
    items: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        tag = data[i]
        length = data[i + 1]
        i += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[i : i + n], "big")
            i += n
        items.append((tag, data[i : i + length]))
        i += length
    return items


def _encode_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([parts[0] * 40 + parts[1]])
    for value in parts[2:]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


def pck_info(chain_pem: bytes) -> PckInfo:
    """FMSPC (from the SGX extension of the leaf) and issuing CA type of a PCK chain."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    leaf = certs[0]
    issuer_cns = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(issuer_cns[0].value) if issuer_cns else ""
    if "Processor" in issuer:
        ca = "processor"
    elif "Platform" in issuer:
        ca = "platform"
    else:
        raise _bad_quote(f"PCK certificate issued by {issuer!r}, not an Intel SGX PCK CA")
    try:
        ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(_SGX_EXTENSIONS_OID))
    except x509.ExtensionNotFound:
        raise _bad_quote("PCK certificate lacks the SGX extensions") from None
    raw = ext.value.public_bytes()
    fmspc_oid = _encode_oid(_FMSPC_OID)
    # The extension is SEQUENCE OF SEQUENCE { OID, value }.
    for _tag, outer in _der_items(raw):
        for _tag2, entry in _der_items(outer):
            parts = _der_items(entry)
            if len(parts) == 2 and parts[0] == (0x06, fmspc_oid) and parts[1][0] == 0x04:
                return PckInfo(parts[1][1].hex().upper(), ca)
    raise _bad_quote("PCK certificate has no FMSPC")


# --- collateral --------------------------------------------------------------------------


@dataclass(frozen=True)
class DcapCollateral:
    """The collateral files for one (TEE, FMSPC, CA) and when the first of them expires."""

    files: dict[str, bytes]
    valid_until: int


def _parse_time(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def _header(headers: dict[str, str], *names: str) -> bytes:
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in names:
        if name.lower() in lowered:
            return urllib.parse.unquote(lowered[name.lower()]).encode()
    raise CollateralUnavailable(
        f"the PCS/PCCS response lacks the {names[0]} header; is the URL an Intel PCS v4 "
        "compatible service?"
    )


def _maybe_hex(body: bytes) -> bytes:
    # PCCS returns the root CA CRL hex-encoded; Intel's distribution point returns DER.
    text = body.strip()
    if text and all(chr(c) in string.hexdigits for c in text):
        return bytes.fromhex(text.decode())
    return body


def collateral_valid_until(files: dict[str, bytes]) -> int:
    """The earliest nextUpdate among TCB info, QE identity and the two CRLs."""
    tcb = json.loads(files["tcb_info.json"])["tcbInfo"]["nextUpdate"]
    qe = json.loads(files["qe_identity.json"])["enclaveIdentity"]["nextUpdate"]
    times = [_parse_time(tcb), _parse_time(qe)]
    for name in ("pck_crl.der", "root_ca_crl.der"):
        crl = x509.load_der_x509_crl(files[name])
        if crl.next_update_utc is not None:
            times.append(int(crl.next_update_utc.timestamp()))
    return min(times)


_SIGNED_JSON = re.compile(
    rb'^\s*\{\s*"(?:tcbInfo|enclaveIdentity)"\s*:\s*(\{.*\})\s*,\s*"signature"\s*:\s*'
    rb'"([0-9a-fA-F]+)"\s*\}\s*$',
    re.DOTALL,
)


def dcap_qvl_collateral(files: dict[str, bytes]) -> bytes | None:
    """The same collateral in dcap-qvl's JSON form. The signed TCB info / QE identity must be
    the exact bytes Intel signed, so they are cut out of the response, never re-serialized."""
    tcb = _SIGNED_JSON.match(files["tcb_info.json"])
    qe = _SIGNED_JSON.match(files["qe_identity.json"])
    if tcb is None or qe is None:
        return None
    document = {
        "pck_crl_issuer_chain": files["pck_crl_issuer_chain.pem"].decode(),
        "root_ca_crl": files["root_ca_crl.der"].hex(),
        "pck_crl": files["pck_crl.der"].hex(),
        "tcb_info_issuer_chain": files["tcb_info_issuer_chain.pem"].decode(),
        "tcb_info": tcb.group(1).decode(),
        "tcb_info_signature": tcb.group(2).decode(),
        "qe_identity_issuer_chain": files["qe_identity_issuer_chain.pem"].decode(),
        "qe_identity": qe.group(1).decode(),
        "qe_identity_signature": qe.group(2).decode(),
    }
    return json.dumps(document, indent=1).encode()


def root_ca_crl_url(base_url: str) -> str:
    if urllib.parse.urlparse(base_url).hostname == "api.trustedservices.intel.com":
        return INTEL_ROOT_CA_CRL_URL
    return f"{base_url}/sgx/certification/v4/rootcacrl"


def fetch_collateral(fetch: Fetch, base_url: str, tee: str, pck: PckInfo) -> DcapCollateral:
    """Downloads the seven collateral files for a quote's platform."""
    base = base_url.rstrip("/")
    family = "tdx" if tee == "tdx" else "sgx"
    try:
        tcb_body, tcb_headers = fetch(f"{base}/{family}/certification/v4/tcb?fmspc={pck.fmspc}")
        qe_body, qe_headers = fetch(f"{base}/{family}/certification/v4/qe/identity")
        crl_body, crl_headers = fetch(
            f"{base}/sgx/certification/v4/pckcrl?ca={pck.ca}&encoding=der"
        )
        root_body, _ = fetch(root_ca_crl_url(base))
    except CollateralUnavailable:
        raise
    except Exception as exc:
        raise CollateralUnavailable(
            f"could not fetch DCAP collateral from {base} ({exc}); check network access to "
            "Intel PCS or set the PCCS URL of your cloud/provider"
        ) from exc
    files = {
        "tcb_info.json": tcb_body,
        "tcb_info_issuer_chain.pem": _header(
            tcb_headers, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
        ),
        "qe_identity.json": qe_body,
        "qe_identity_issuer_chain.pem": _header(
            qe_headers, "SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"
        ),
        "pck_crl.der": _maybe_hex(crl_body),
        "pck_crl_issuer_chain.pem": _header(crl_headers, "SGX-PCK-CRL-Issuer-Chain"),
        "root_ca_crl.der": _maybe_hex(root_body),
    }
    try:
        valid_until = collateral_valid_until(files)
    except (KeyError, ValueError, TypeError) as exc:
        raise CollateralUnavailable(
            f"the collateral served by {base} is malformed ({exc!r}); check the PCCS version"
        ) from None
    qvl = dcap_qvl_collateral(files)
    if qvl is not None:
        files[DCAP_QVL_FILE] = qvl
    return DcapCollateral(files, valid_until)


class CollateralCache:
    """Collateral per platform, kept in memory and on disk, refreshed `refresh_margin`
    seconds before its first nextUpdate so clients never receive expiring collateral."""

    def __init__(
        self,
        tee: str,
        base_url: str = INTEL_PCS_URL,
        *,
        fetch: Fetch = urllib_fetch,
        cache_dir: Path | None = None,
        refresh_margin: int = 86400,
        retry_interval: int = 300,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.tee = tee
        self.base_url = base_url
        self._fetch = fetch
        self._cache_dir = cache_dir
        self._margin = refresh_margin
        self._retry_interval = retry_interval
        self._now = now
        self._lock = threading.Lock()
        self._memory: dict[PckInfo, DcapCollateral] = {}
        self._last_attempt: dict[PckInfo, float] = {}

    def _fresh(self, collateral: DcapCollateral) -> bool:
        return self._now() < collateral.valid_until - self._margin

    def get(self, pck: PckInfo) -> DcapCollateral:
        with self._lock:
            cached = self._memory.get(pck) or self._load_disk(pck)
            if cached is not None and self._fresh(cached):
                self._memory[pck] = cached
                return cached
            # Stale: refetch, but not more often than retry_interval (PCS is rate limited and
            # Intel publishes new collateral only once a day or so).
            last = self._last_attempt.get(pck)
            if (
                cached is not None
                and last is not None
                and self._now() - last < self._retry_interval
            ):
                return cached
            self._last_attempt[pck] = self._now()
            try:
                fetched = fetch_collateral(self._fetch, self.base_url, self.tee, pck)
            except CollateralUnavailable:
                if cached is None:
                    raise
                log.warning("collateral refresh failed; serving cached collateral", exc_info=True)
                return cached
            if not self._fresh(fetched):
                log.warning(
                    "the PCS served collateral that expires at %d, within the refresh margin",
                    fetched.valid_until,
                )
            self._memory[pck] = fetched
            self._store_disk(pck, fetched)
            return fetched

    def valid_until(self) -> int | None:
        with self._lock:
            if not self._memory:
                return None
            return min(c.valid_until for c in self._memory.values())

    def _dir(self, pck: PckInfo) -> Path | None:
        if self._cache_dir is None:
            return None
        return self._cache_dir / f"{self.tee}-{pck.fmspc}-{pck.ca}"

    def _load_disk(self, pck: PckInfo) -> DcapCollateral | None:
        directory = self._dir(pck)
        if directory is None or not directory.is_dir():
            return None
        try:
            files = {name: (directory / name).read_bytes() for name in COLLATERAL_FILES}
            valid_until = collateral_valid_until(files)
        except (OSError, KeyError, ValueError, TypeError):
            log.warning("ignoring unreadable collateral cache at %s", directory)
            return None
        qvl = dcap_qvl_collateral(files)
        if qvl is not None:
            files[DCAP_QVL_FILE] = qvl
        return DcapCollateral(files, valid_until)

    def _store_disk(self, pck: PckInfo, collateral: DcapCollateral) -> None:
        directory = self._dir(pck)
        if directory is None:
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name in COLLATERAL_FILES:
                # Write-then-rename so a crash never leaves a half-written cache file.
                tmp = directory / f".{name}.tmp"
                tmp.write_bytes(collateral.files[name])
                os.replace(tmp, directory / name)
        except OSError:
            log.warning("could not write the collateral cache at %s", directory, exc_info=True)
