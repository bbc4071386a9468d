"""Client-side verifier for AMD SEV-SNP evidence (kind ``sev-snp``).

This module owns (the report's layout lives in `formats.snp`): the AMD certificate chain
ARK -> ASK -> VCEK (RSASSA-PSS SHA-384), the report signature (ECDSA P-384 / SHA-384 under the
VCEK), the binding of the VCEK to the reporting chip (hwID == CHIP_ID) and to the reported TCB
(the VCEK's SPL extensions == REPORTED_TCB), and the lookup of a VCEK in a local cache folder.

It does not judge what the report says (measurement, policy bits, minimum TCB): that is the
policy's job. It only proves the report is genuine and returns the claims as a `Verdict`.

Collateral keys (as the server publishes them):
  ``vcek.der``     the VCEK certificate of the reporting chip at its reported TCB, DER or PEM.
  ``ask_ark.pem``  optional ASK + ARK (KDS ``cert_chain`` order, either order accepted). The ARK
                   must equal the bundled ARK of the chip's product line; when absent the
                   bundled ASK + ARK are used.

VCEK cache: when the collateral has no ``vcek.der``, ``verify(..., vcek_cache_dir=d)`` (or
`VerifierOptions(vcek_cache_dir=d)` through `verify_evidence`, `connect` and the CLI's
``--vcek-cache``) reads ``d / formats.snp.vcek_cache_name(CHIP_ID, REPORTED_TCB)``, e.g.
``d49554...1eb6-3-0-8-115.der``: the AMD KDS parameters, so a file fetched from KDS can be
stored under that name unchanged (DER or PEM both work).
"""

from __future__ import annotations

import datetime as _dt
import warnings
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.formats.snp import (
    SIG_ALGO_ECDSA_P384_SHA384,
    SIGNING_KEY_VCEK,
    Report,
    Tcb,
    kds_vcek_path,
    parse_report,
    vcek_cache_name,
)
from blindfold.attestation.verdict import Verdict
from blindfold.errors import EvidenceError

KIND = "sev-snp"

# VCEK extension OIDs (AMD "Versioned Chip Endorsement Key" specification, KDS spec 57230)
OID_PRODUCT_NAME = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.2")
OID_BL_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
OID_TEE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
OID_SNP_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
OID_HW_ID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")

ROOTS_DIR = Path(__file__).resolve().parent / "roots"
BUNDLED_ASK_ARK = {
    "Milan": "amd_milan_ask_ark.pem",
    "Genoa": "amd_genoa_ask_ark.pem",
}

# AMD signs ASK and VCEK with exactly these RSASSA-PSS parameters; accepting whatever the
# certificate claims would let a weaker parameter set through.
_AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_DER = serialization.Encoding.DER


def verify(
    evidence: bytes,
    collateral: dict[str, bytes],
    at: int,
    *,
    vcek_cache_dir: Path | None = None,
) -> Verdict:
    """Verifies SEV-SNP evidence at unix time `at` and returns its claims.

    Raises EvidenceError naming the failed check when the report is malformed, not signed by
    the VCEK, the VCEK is for another chip or TCB, or the chain does not reach the bundled AMD
    root or is not valid at `at`.
    """
    report = parse_report(evidence)
    _check_signature_algo(report)
    vcek = _load_vcek(report, collateral, vcek_cache_dir)
    product = _product_line(vcek)
    ask, ark = _ask_and_ark(product, collateral.get(files.ASK_ARK))
    _check_chain(ark, ask, vcek, product)
    valid_from, valid_until = _check_validity((ark, ask, vcek), at)
    _check_vcek_binds_report(vcek, report)
    _check_report_signature(vcek, report)
    return _verdict(report, valid_from, valid_until)


# --- the report ---


def _check_signature_algo(report: Report) -> None:
    if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise EvidenceError(
            f"SEV-SNP report SIGNATURE_ALGO: expected {SIG_ALGO_ECDSA_P384_SHA384} "
            f"(ECDSA P-384 with SHA-384), found {report.signature_algo}. The report is "
            "corrupt or not produced by AMD firmware."
        )
    if report.signing_key != SIGNING_KEY_VCEK:
        # 1 = VLEK (cloud-provider key, different chain), 7 = unsigned. Only VCEK is supported.
        raise EvidenceError(
            f"SEV-SNP report is signed by key type {report.signing_key}, expected 0 (VCEK). "
            "VLEK-signed or unsigned reports are not supported; configure the host to sign "
            "reports with the VCEK."
        )


def _check_report_signature(vcek: x509.Certificate, report: Report) -> None:
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError(
            "VCEK public key: expected an ECDSA P-384 key, found "
            f"{type(key).__name__}. The vcek.der collateral is not an AMD VCEK."
        )
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError(
            "SEV-SNP report signature does not verify with the VCEK (ECDSA P-384/SHA-384 over "
            "bytes 0x000-0x2A0): the report was altered after the AMD secure processor signed "
            "it. Do not trust this server."
        ) from None


# --- the VCEK: where it comes from and what it certifies ---


def _load_vcek(
    report: Report, collateral: dict[str, bytes], cache_dir: Path | None
) -> x509.Certificate:
    data = collateral.get(files.VCEK)
    source = "collateral 'vcek.der'"
    if data is None and cache_dir is not None:
        path = Path(cache_dir) / vcek_cache_name(report.chip_id, report.reported_tcb)
        source = f"VCEK cache file {path}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EvidenceError(
                f"no VCEK for this report: the collateral has no 'vcek.der' and {source} "
                f"cannot be read ({exc.strerror}). Fetch it from AMD KDS ("
                f"{kds_vcek_path('<product>', report.chip_id, report.reported_tcb)}) and "
                "store it under that name."
            ) from None
    if data is None:
        raise EvidenceError(
            "no VCEK for this report: the collateral has no 'vcek.der' and no VCEK cache "
            "folder was given. Ask the server to publish its VCEK, or pass vcek_cache_dir."
        )
    return _load_certificate(data, source)


def _load_certificate(data: bytes, source: str) -> x509.Certificate:
    certs = _load_certificates(data, source)
    if len(certs) != 1:
        raise EvidenceError(f"{source}: expected one certificate, found {len(certs)}.")
    return certs[0]


def _load_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    # AMD issues VCEKs with serial number 0, which cryptography >= 42 accepts with a
    # deprecation warning; the warning is noise for our users, the serial plays no part here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if b"-----BEGIN" in data:
                return x509.load_pem_x509_certificates(data)
            return [x509.load_der_x509_certificate(data)]
        except ValueError as exc:
            raise EvidenceError(
                f"{source} is not a valid X.509 certificate in DER or PEM ({exc}). "
                "Fetch it again from AMD KDS."
            ) from None


def _extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier, name: str) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        raise EvidenceError(
            f"VCEK has no {name} extension ({oid.dotted_string}); it is not an AMD VCEK."
        ) from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceError(f"VCEK {name} extension has an unexpected form.")
    return value.value


def _extension_int(cert: x509.Certificate, oid: x509.ObjectIdentifier, name: str) -> int:
    raw = _extension_bytes(cert, oid, name)
    # DER INTEGER: tag 0x02, short length, big-endian two's complement content (SPLs are 0..255)
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2 or raw[1] > 2:
        raise EvidenceError(f"VCEK {name} extension is not a small DER INTEGER: {raw.hex()}.")
    return int.from_bytes(raw[2:], "big", signed=True)


def _vcek_hwid(vcek: x509.Certificate) -> bytes:
    raw = _extension_bytes(vcek, OID_HW_ID, "hwID")
    # KDS stores the 64-byte chip id raw; tolerate a DER OCTET STRING wrapping as well.
    if len(raw) == 66 and raw[0] == 0x04 and raw[1] == 64:
        return raw[2:]
    return raw


def _product_line(vcek: x509.Certificate) -> str:
    raw = _extension_bytes(vcek, OID_PRODUCT_NAME, "productName")
    # DER IA5String (tag 0x16) such as "Milan-B0"; the line is the part before the stepping.
    text = raw[2:] if len(raw) >= 2 and raw[0] == 0x16 else raw
    name = text.decode("ascii", "replace").split("-")[0]
    if name not in BUNDLED_ASK_ARK:
        raise EvidenceError(
            f"VCEK product line: expected one of {sorted(BUNDLED_ASK_ARK)}, found {name!r}. "
            "Blindfold bundles no AMD root for it (and its TCB layout may differ); run the "
            "server on a supported EPYC generation."
        )
    return name


def _check_vcek_binds_report(vcek: x509.Certificate, report: Report) -> None:
    hwid = _vcek_hwid(vcek)
    if hwid != report.chip_id:
        raise EvidenceError(
            f"VCEK is for another chip: VCEK hwID {hwid.hex()[:16]}..., report CHIP_ID "
            f"{report.chip_id.hex()[:16]}... Use the VCEK of the reporting chip (KDS "
            f"/vcek/v1/<product>/{report.chip_id.hex()})."
        )
    vcek_tcb = Tcb(
        bootloader=_extension_int(vcek, OID_BL_SPL, "blSPL"),
        tee=_extension_int(vcek, OID_TEE_SPL, "teeSPL"),
        snp=_extension_int(vcek, OID_SNP_SPL, "snpSPL"),
        microcode=_extension_int(vcek, OID_UCODE_SPL, "ucodeSPL"),
    )
    if vcek_tcb != report.reported_tcb:
        raise EvidenceError(
            f"VCEK TCB: expected the report's REPORTED_TCB ({report.reported_tcb.describe()}), "
            f"found {vcek_tcb.describe()}. Fetch the VCEK for the reported TCB from AMD KDS."
        )


# --- the AMD chain ---


@cache
def bundled_ask_ark(product: str) -> tuple[x509.Certificate, x509.Certificate]:
    """The bundled (ASK, ARK) of an AMD product line ("Milan", "Genoa")."""
    data = (ROOTS_DIR / BUNDLED_ASK_ARK[product]).read_bytes()
    source = f"bundled {product} ASK/ARK"
    return _split_ask_ark(_load_certificates(data, source), source)


def _split_ask_ark(
    certs: list[x509.Certificate], source: str
) -> tuple[x509.Certificate, x509.Certificate]:
    if len(certs) != 2:
        raise EvidenceError(f"{source}: expected 2 certificates (ASK and ARK), found {len(certs)}.")
    # KDS publishes ASK then ARK; accept either order, the ARK is the self-issued one.
    first, second = certs
    if first.subject == first.issuer and second.subject != second.issuer:
        return second, first
    return first, second


def _ask_and_ark(product: str, supplied: bytes | None) -> tuple[x509.Certificate, x509.Certificate]:
    bundled_ask, bundled_ark = bundled_ask_ark(product)
    if supplied is None:
        return bundled_ask, bundled_ark
    source = "collateral 'ask_ark.pem'"
    ask, ark = _split_ask_ark(_load_certificates(supplied, source), source)
    if ark.public_bytes(_DER) != bundled_ark.public_bytes(_DER):
        raise EvidenceError(
            f"the ARK in collateral 'ask_ark.pem' is not AMD's ARK-{product} bundled with "
            f"Blindfold (found subject {ark.subject.rfc4514_string()}). The chain does not "
            "lead to AMD; do not trust this server."
        )
    return ask, ark


def _check_chain(
    ark: x509.Certificate, ask: x509.Certificate, vcek: x509.Certificate, product: str
) -> None:
    _check_pss_signed(ark, ark, f"ARK-{product} self-signature")
    _check_pss_signed(ask, ark, f"ASK (SEV-{product}) signature by the ARK")
    _check_pss_signed(vcek, ask, f"VCEK signature by the ASK (SEV-{product})")


def _check_pss_signed(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        raise EvidenceError(
            f"{what}: expected RSASSA-PSS, found {cert.signature_algorithm_oid.dotted_string}."
        )
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise EvidenceError(f"{what}: the issuer key is not RSA; this is not an AMD chain.")
    if cert.issuer != issuer.subject:
        raise EvidenceError(
            f"{what}: issuer name {cert.issuer.rfc4514_string()} does not match "
            f"{issuer.subject.rfc4514_string()}. The VCEK belongs to another product line or "
            "the chain is forged."
        )
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _AMD_PSS, hashes.SHA384())
    except InvalidSignature:
        raise EvidenceError(
            f"{what} is invalid (RSASSA-PSS SHA-384, MGF1 SHA-384, salt 48). The chain does "
            "not lead to AMD; do not trust this server."
        ) from None


def _check_validity(certs: tuple[x509.Certificate, ...], at: int) -> tuple[int, int]:
    valid_from = max(int(c.not_valid_before_utc.timestamp()) for c in certs)
    valid_until = min(int(c.not_valid_after_utc.timestamp()) for c in certs)
    for cert in certs:
        start = int(cert.not_valid_before_utc.timestamp())
        end = int(cert.not_valid_after_utc.timestamp())
        if not start <= at <= end:
            raise EvidenceError(
                f"certificate {cert.subject.rfc4514_string()} is not valid at {_utc(at)}: "
                f"valid {_utc(start)} .. {_utc(end)}. Check the clock, or fetch a current VCEK "
                "from AMD KDS."
            )
    return valid_from, valid_until


def _utc(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the verdict ---


def _verdict(report: Report, valid_from: int, valid_until: int) -> Verdict:
    tcb = report.reported_tcb
    measurements: dict[str, object] = {
        "measurement": report.measurement.hex(),
        "host_data": report.host_data.hex(),
        "policy": report.policy,
        "reported_tcb_bootloader": tcb.bootloader,
        "reported_tcb_tee": tcb.tee,
        "reported_tcb_snp": tcb.snp,
        "reported_tcb_microcode": tcb.microcode,
        "chip_id": report.chip_id.hex(),
        "vmpl": report.vmpl,
        "guest_svn": report.guest_svn,
        "version": report.version,
        # Beyond the documented keys: identity fields a policy may want to pin.
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "author_key_digest": report.author_key_digest.hex(),
        "report_id": report.report_id.hex(),
        "platform_info": report.platform_info,
    }
    return Verdict(
        kind=KIND,
        measurements=measurements,
        report_data=report.report_data,
        debug=report.debug,
        tcb_status=None,
        valid_from=valid_from,
        valid_until=valid_until,
    )
