"""Intel DCAP ECDSA quotes: SGX quote v3 (and v4), TDX quote v4 with a TD report 1.0.

This module owns the quote's framing (header, report body, signature data, cut by their
length fields), the field offsets of the SGX report body and the TD report body, and the
PCK certificate chain embedded in the certification data (read through dcap-qvl, which
already parses that nested structure, together with the chain's FMSPC and issuing CA).

Decided once for both sides: version 5 quotes (TDX 1.5 with its 648-byte TD report) are
refused. No v5 quote verifies against real collateral in the vector store, clients refuse
them, and a server that published them would only ever be refused; it now fails at start
with this message instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import dcap_qvl

from blindfold.errors import EvidenceError

TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
TEE_NAMES = {TEE_TYPE_SGX: "sgx", TEE_TYPE_TDX: "tdx"}

HEADER_LEN = 48
SGX_REPORT_LEN = 384  # sgx_report_body_t
TD_REPORT10_LEN = 584  # sgx_report2_body_t (TDX 1.0)
REPORT_DATA_LEN = 64

# Offsets into the 384-byte SGX REPORTBODY (Intel SGX DCAP quote library, sgx_report_body_t).
SGX_FIELDS: dict[str, slice] = {
    "cpu_svn": slice(0, 16),
    "attributes": slice(48, 64),
    "mr_enclave": slice(64, 96),
    "mr_signer": slice(128, 160),
}
SGX_ISV_PROD_ID_AT = 256
SGX_ISV_SVN_AT = 258
SGX_REPORT_DATA = slice(320, 384)
SGX_DEBUG_FLAG = 0x2  # SGX_FLAGS_DEBUG: bit 1 of the low 64-bit ATTRIBUTES.FLAGS word

# Offsets into the 584-byte TD report 1.0 body of a v4 quote (sgx_report2_body_t).
TDX_FIELDS: dict[str, slice] = {
    "tee_tcb_svn": slice(0, 16),
    "mr_seam": slice(16, 64),
    "td_attributes": slice(120, 128),
    "xfam": slice(128, 136),
    "mr_td": slice(136, 184),
    "mr_config_id": slice(184, 232),
    "mr_owner": slice(232, 280),
    "mr_owner_config": slice(280, 328),
    "rtmr0": slice(328, 376),
    "rtmr1": slice(376, 424),
    "rtmr2": slice(424, 472),
    "rtmr3": slice(472, 520),
}
TDX_REPORT_DATA = slice(520, 584)
# TD_ATTRIBUTES.DEBUG is bit 0 of the little-endian attributes: the TD's memory and CPU
# state are open to the host, so it protects nothing.
TDX_DEBUG_FLAG = 0x1

MALFORMED_ADVICE = "Check that the evidence is a whole quote."


@dataclass(frozen=True)
class Quote:
    """A quote cut out of evidence bytes: header fields, the report body, the exact signed
    quote (`raw`, without trailing bytes) and its kind ("sgx" or "tdx")."""

    raw: bytes
    version: int
    tee_type: int
    body: bytes

    @property
    def kind(self) -> str:
        return TEE_NAMES[self.tee_type]

    @property
    def report_data(self) -> bytes:
        return self.body[TDX_REPORT_DATA if self.kind == "tdx" else SGX_REPORT_DATA]

    @property
    def debug(self) -> bool:
        if self.kind == "tdx":
            return bool(self.body[TDX_FIELDS["td_attributes"]][0] & TDX_DEBUG_FLAG)
        (flags,) = struct.unpack_from("<Q", self.body, SGX_FIELDS["attributes"].start)
        return bool(flags & SGX_DEBUG_FLAG)

    def claims(self) -> dict[str, Any]:
        """The identity fields of the report body, as the policy compares them (hex strings
        for byte fields, ints for numbers). For TDX, `mr_seam` (the TDX module) is included
        so a policy can pin the module too."""
        if self.kind == "tdx":
            return {name: self.body[where].hex() for name, where in TDX_FIELDS.items()}
        (isv_prod_id,) = struct.unpack_from("<H", self.body, SGX_ISV_PROD_ID_AT)
        (isv_svn,) = struct.unpack_from("<H", self.body, SGX_ISV_SVN_AT)
        return {
            "mr_enclave": self.body[SGX_FIELDS["mr_enclave"]].hex(),
            "mr_signer": self.body[SGX_FIELDS["mr_signer"]].hex(),
            "isv_prod_id": isv_prod_id,
            "isv_svn": isv_svn,
            "attributes": self.body[SGX_FIELDS["attributes"]].hex(),
            "cpu_svn": self.body[SGX_FIELDS["cpu_svn"]].hex(),
        }


def parse_quote(evidence: bytes) -> Quote:
    """Cuts the quote out of `evidence` by its length fields.

    Evidence files often carry trailing bytes (zero padding, text markers): the quote is
    what the signature-data length says, and only that is handed on.
    """
    if len(evidence) < HEADER_LEN:
        raise EvidenceError(
            f"DCAP quote is truncated: {len(evidence)} bytes, shorter than the "
            f"{HEADER_LEN}-byte quote header. {MALFORMED_ADVICE}"
        )
    version, _key_type, tee_type = struct.unpack_from("<HHI", evidence, 0)
    body_len = _body_len(version, tee_type)
    sig_len_at = HEADER_LEN + body_len
    if len(evidence) < sig_len_at + 4:
        raise EvidenceError(
            f"DCAP quote v{version} is truncated: {len(evidence)} bytes, but its header and "
            f"report body alone need {sig_len_at + 4}. {MALFORMED_ADVICE}"
        )
    (sig_len,) = struct.unpack_from("<I", evidence, sig_len_at)
    quote_len = sig_len_at + 4 + sig_len
    if len(evidence) < quote_len:
        raise EvidenceError(
            f"DCAP quote v{version} is truncated: its length fields say {quote_len} bytes, "
            f"only {len(evidence)} are present. {MALFORMED_ADVICE}"
        )
    return Quote(
        raw=bytes(evidence[:quote_len]),
        version=version,
        tee_type=tee_type,
        body=bytes(evidence[HEADER_LEN:sig_len_at]),
    )


def _body_len(version: int, tee_type: int) -> int:
    if version == 5:
        raise EvidenceError(
            "DCAP quote version 5 (TDX 1.5) is not supported: Blindfold verifies quote v3 "
            "(SGX) and v4 (SGX, TDX 1.0). Run the TD on a TDX 1.0 module or configure the "
            "quoting service for v4 quotes."
        )
    if version not in (3, 4):
        raise EvidenceError(
            f"not a supported DCAP quote: header says version {version} (expected 3 for SGX "
            "or 4 for TDX). The evidence may be garbage, or of another TEE kind."
        )
    if tee_type == TEE_TYPE_SGX:
        return SGX_REPORT_LEN
    if tee_type == TEE_TYPE_TDX and version == 4:
        return TD_REPORT10_LEN
    raise EvidenceError(
        f"not a supported DCAP quote: version {version} with TEE type {tee_type:#x} "
        "(expected 0x0 for SGX or 0x81 for TDX)."
    )


def require_kind(quote: Quote, kind: str) -> None:
    """An SGX quote presented as TDX (or the reverse) is not the evidence it claims to be."""
    if quote.kind != kind:
        raise EvidenceError(
            f"evidence declared as kind '{kind}' is a DCAP quote of TEE type '{quote.kind}'; "
            "the server's attestation kind and its evidence disagree."
        )


@dataclass(frozen=True)
class PckCertificate:
    """What the PCK certificate chain in a quote says about the platform: the chain itself
    (PEM, leaf first), its FMSPC (12 upper-case hex digits, as Intel PCS expects) and the
    issuing PCK CA ("processor" or "platform")."""

    chain_pem: bytes
    fmspc: str
    ca: str


def pck_certificate(quote: Quote) -> PckCertificate:
    """The PCK chain embedded in the quote's certification data, with FMSPC and CA."""
    try:
        parsed = dcap_qvl.parse_quote(quote.raw)
        chain = parsed.cert_chain_pem_bytes()
        fmspc, ca = str(parsed.fmspc()).upper(), str(parsed.ca()).lower()
    except ValueError as exc:
        raise EvidenceError(
            f"DCAP quote has no readable PCK certificate chain ({' '.join(str(exc).split())}). "
            f"{MALFORMED_ADVICE}"
        ) from None
    if ca not in ("processor", "platform"):
        raise EvidenceError(f"DCAP quote's PCK certificate is issued by {ca!r}, not a PCK CA.")
    # Quote-embedded chains may end with a NUL inside their declared size.
    return PckCertificate(bytes(chain or b"").rstrip(b"\0"), fmspc, ca)
