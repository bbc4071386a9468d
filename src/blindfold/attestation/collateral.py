"""Reading verifier collateral from disk for `blindfold attest --collateral PATH`.

This module owns the mapping from what a user has on disk (a vector folder of the
attestation store, a single dcap-qvl collateral JSON, a single VCEK certificate) to the
`{file name: bytes}` dict that `Evidence.collateral` and the verifiers consume. It reads
files only; checking them is the verifiers' job.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.kinds import TEE_KINDS, tee_kind
from blindfold.errors import ConfigurationError

# Evidence, not collateral: a vector folder holds both side by side.
EVIDENCE_FILES = frozenset({"quote.bin", "report.bin", "attestation_doc.cbor"})
COLLATERAL_SUFFIXES = frozenset({".json", ".pem", ".der", ".crl", ".crt", ".cer"})

MAX_FILE_BYTES = 4 * 1024 * 1024  # collateral is kilobytes; refuse to slurp a stray disk image


def load_collateral(path: Path, kind: str) -> dict[str, bytes]:
    """Reads the collateral at `path` for evidence of `kind`.

    `path` is a folder laid out like a vector folder (every collateral file in it is read,
    evidence files are skipped), a dcap-qvl collateral JSON file, or a VCEK certificate
    (DER or PEM, returned as DER under ``vcek.der``).
    """
    if kind not in TEE_KINDS:
        raise ConfigurationError(
            f"unknown TEE kind '{kind}'; expected one of {', '.join(TEE_KINDS)}"
        )
    path = Path(path)
    if path.is_dir():
        found = _read_folder(path)
    elif path.is_file():
        found = _read_single_file(path)
    else:
        raise ConfigurationError(f"collateral path {path} does not exist")
    _require_enough(found, kind, path)
    return found


def _read_folder(folder: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for entry in sorted(folder.iterdir()):
        if not _is_collateral_file(entry):
            continue
        data = _read(entry)
        if entry.name == "vcek.pem":
            found[files.VCEK] = _certificate_der(data, entry)
        else:
            found[entry.name] = data
    return found


def _is_collateral_file(entry: Path) -> bool:
    return (
        entry.is_file()
        and not entry.name.startswith(".")
        and entry.name not in EVIDENCE_FILES
        and entry.suffix.lower() in COLLATERAL_SUFFIXES
    )


def _read_single_file(path: Path) -> dict[str, bytes]:
    data = _read(path)
    if path.suffix.lower() == ".json" or data.lstrip().startswith(b"{"):
        _require_dcap_json(data, path)
        return {files.DCAP_QVL_JSON: data}
    return {files.VCEK: _certificate_der(data, path)}


def _require_dcap_json(data: bytes, path: Path) -> None:
    try:
        parsed = json.loads(data)
    except ValueError:
        raise ConfigurationError(f"collateral file {path} is not valid JSON") from None
    if not isinstance(parsed, dict) or not {"tcb_info", "qe_identity"} <= parsed.keys():
        raise ConfigurationError(
            f"collateral file {path} is not dcap-qvl QuoteCollateralV3 JSON (expected keys "
            "'tcb_info', 'qe_identity', ...); pass the folder holding tcb_info.json, "
            "qe_identity.json, the issuer chains and CRLs instead"
        )


def _certificate_der(data: bytes, path: Path) -> bytes:
    """DER bytes of one certificate, unwrapped from PEM if needed.

    Not parsed as X.509 here: real AMD VCEKs carry a zero serial number, which
    `cryptography` already warns about and will refuse in a future release; the SEV-SNP
    verifier decides how to parse them.
    """
    der = data
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    if data.lstrip().startswith(begin):
        body = data.lstrip()[len(begin) :].split(end, 1)[0]
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except binascii.Error:
            der = b""
    if not der.startswith(b"\x30"):  # a DER SEQUENCE
        raise ConfigurationError(
            f"collateral file {path} is neither dcap-qvl JSON nor an X.509 certificate (DER or PEM)"
        )
    return der


def _read(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigurationError(
            f"collateral file {path} is {size} bytes; collateral files are at most "
            f"{MAX_FILE_BYTES} bytes. Is this the right path?"
        )
    return path.read_bytes()


def _require_enough(found: dict[str, bytes], kind: str, path: Path) -> None:
    """Fails early with a clear message instead of a confusing verifier error later."""
    missing = tee_kind(kind).missing_collateral(found)
    if missing:
        raise ConfigurationError(f"no {kind} collateral at {path}: {missing}")
