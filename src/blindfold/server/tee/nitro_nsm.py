"""AWS Nitro Enclaves attestation documents from the Nitro Secure Module (/dev/nsm).

This module owns the NSM wire protocol as aws-nitro-enclaves-nsm-api speaks it: a CBOR
request (serde's externally tagged enum, e.g. {"Attestation": {...}}) and a CBOR response,
exchanged with one ioctl (include/uapi/linux/nsm.h: NSM_IOCTL_RAW = _IOWR(0x0A, 0, nsm_raw)).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import threading
from pathlib import Path
from typing import Any

import cbor2

from blindfold.attestation.formats import nitro
from blindfold.attestation.verdict import Evidence
from blindfold.errors import EvidenceError
from blindfold.server.tee.errors import TeeUnavailable

NSM_MAGIC = 0x0A
NSM_REQUEST_MAX_SIZE = 0x1000
NSM_RESPONSE_MAX_SIZE = 0x3000
# struct nsm_raw { struct nsm_iovec { u64 addr; u64 len; } request, response; }
NSM_RAW_FORMAT = "<QQQQ"
NSM_RAW_SIZE = struct.calcsize(NSM_RAW_FORMAT)  # 32
NSM_IOCTL_RAW = (3 << 30) | (NSM_RAW_SIZE << 16) | (NSM_MAGIC << 8) | 0x0


def encode_attestation_request(
    user_data: bytes, nonce: bytes | None = None, public_key: bytes | None = None
) -> bytes:
    """The CBOR of Request::Attestation; Nitro caps each field at 512 bytes."""
    for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
        if value is not None and len(value) > 512:
            raise ValueError(f"NSM {name} is limited to 512 bytes, got {len(value)}")
    request = {"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}}
    encoded = cbor2.dumps(request)
    if len(encoded) > NSM_REQUEST_MAX_SIZE:
        raise ValueError("NSM request too large")
    return encoded


def pack_nsm_raw(req_addr: int, req_len: int, resp_addr: int, resp_len: int) -> bytes:
    return struct.pack(NSM_RAW_FORMAT, req_addr, req_len, resp_addr, resp_len)


def unpack_response_len(nsm_raw: bytes) -> int:
    """The driver writes the response length back into response.len."""
    return int(struct.unpack_from(NSM_RAW_FORMAT, nsm_raw)[3])


def decode_attestation_response(data: bytes) -> bytes:
    """The attestation document (COSE_Sign1) from Response::Attestation, or a clear error."""
    try:
        response: Any = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise TeeUnavailable(f"the NSM answered with malformed CBOR ({exc})") from None
    if isinstance(response, dict) and "Attestation" in response:
        document = response["Attestation"].get("document")
        if isinstance(document, bytes):
            return document
    if isinstance(response, dict) and "Error" in response:
        raise TeeUnavailable(f"the NSM refused the attestation request: {response['Error']}")
    raise TeeUnavailable(f"unexpected NSM response {type(response).__name__}")


def document_valid_until(document: bytes) -> int:
    """notAfter of the enclave's leaf certificate inside an attestation document (about 3
    hours after issue), so the server knows when to ask for a fresh one. The document is
    read as clients read it (`formats.nitro`); one they would refuse is refused here."""
    try:
        _envelope, doc = nitro.decode(document)
        return int(nitro.leaf_certificate(doc).not_valid_after_utc.timestamp())
    except EvidenceError as exc:
        raise TeeUnavailable(f"the NSM returned a document clients refuse ({exc})") from None


def missing_device_error(device: Path) -> TeeUnavailable:
    return TeeUnavailable(
        f"{device} not found: the server is not running inside an AWS Nitro Enclave (or the "
        "nsm driver is missing from the enclave image); choose another --tee"
    )


class NitroNsmProvider:
    """Nitro attestation documents with the report data as user_data."""

    kind = "nitro"

    def __init__(self, device: Path = Path("/dev/nsm")) -> None:
        self.device = Path(device)
        if not self.device.exists():
            raise missing_device_error(self.device)
        self._lock = threading.Lock()
        self._valid_until: int | None = None

    def _call(self, request: bytes) -> bytes:
        req = ctypes.create_string_buffer(request, len(request))
        resp = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
        arg = bytearray(
            pack_nsm_raw(
                ctypes.addressof(req), len(request), ctypes.addressof(resp), NSM_RESPONSE_MAX_SIZE
            )
        )
        with self._lock:
            fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, NSM_IOCTL_RAW, arg, True)
            except OSError as exc:
                raise TeeUnavailable(
                    f"NSM ioctl on {self.device} failed ({exc.strerror})"
                ) from None
            finally:
                os.close(fd)
        return resp.raw[: unpack_response_len(bytes(arg))]

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != 64:
            raise ValueError(f"report data must be 64 bytes, got {len(report_data)}")
        document = decode_attestation_response(self._call(encode_attestation_request(report_data)))
        self._valid_until = document_valid_until(document)
        return Evidence(self.kind, document, {})

    def collateral_valid_until(self) -> int | None:
        return self._valid_until

    def sealing_key(self) -> bytes | None:
        # The NSM offers no measurement-bound key derivation (KMS with attestation would).
        return None
