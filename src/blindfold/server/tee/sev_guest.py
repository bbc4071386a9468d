"""AMD SEV-SNP evidence and sealing keys through the Linux /dev/sev-guest ioctls.

This module owns the binary interface of include/uapi/linux/sev-guest.h (SNP_GET_REPORT,
SNP_GET_EXT_REPORT, SNP_GET_DERIVED_KEY), the firmware response framing of the SNP ABI
(MSG_REPORT_RSP, MSG_KEY_RSP). The report itself and the GHCB certificate table that
carries VCEK/ASK/ARK are read by `attestation.formats.snp`, as clients read them.
Packing and parsing are pure functions so they can be tested without the device.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.formats import snp
from blindfold.attestation.verdict import Evidence
from blindfold.errors import EvidenceError
from blindfold.server.tee.errors import TeeUnavailable
from blindfold.server.tee.gramine import derive_sealing_key
from blindfold.server.tee.kds import KdsVcekFetcher


def _iowr(ioc_type: int, nr: int, size: int) -> int:
    # Linux asm-generic/ioctl.h: dir(2 bits) | size(14) | type(8) | nr(8); _IOC_READ|_IOC_WRITE = 3.
    return (3 << 30) | (size << 16) | (ioc_type << 8) | nr


# struct snp_guest_request_ioctl { u8 msg_version; u64 req_data; u64 resp_data; u64 exitinfo2; }
GUEST_REQUEST_FORMAT = "<B7xQQQ"
GUEST_REQUEST_SIZE = struct.calcsize(GUEST_REQUEST_FORMAT)  # 32
SNP_GET_REPORT = _iowr(ord("S"), 0x0, GUEST_REQUEST_SIZE)
SNP_GET_DERIVED_KEY = _iowr(ord("S"), 0x1, GUEST_REQUEST_SIZE)
SNP_GET_EXT_REPORT = _iowr(ord("S"), 0x2, GUEST_REQUEST_SIZE)

MSG_VERSION = 1
REPORT_RESP_SIZE = 4000  # struct snp_report_resp
DERIVED_KEY_RESP_SIZE = 64  # struct snp_derived_key_resp
PAGE_SIZE = 4096
SNP_GUEST_VMM_ERR_INVALID_LEN = 1

# MSG_KEY_REQ GUEST_FIELD_SELECT bits (SNP ABI, table "MSG_KEY_REQ Message Structure").
FIELD_GUEST_POLICY = 1 << 0
FIELD_IMAGE_ID = 1 << 1
FIELD_FAMILY_ID = 1 << 2
FIELD_MEASUREMENT = 1 << 3
FIELD_GUEST_SVN = 1 << 4
FIELD_TCB_VERSION = 1 << 5
ROOT_KEY_VCEK = 0
# The sealing key must differ for any other launch measurement, and for the same image
# launched under a weaker policy (e.g. debug allowed), so both are mixed in.
SEALING_FIELDS = FIELD_GUEST_POLICY | FIELD_MEASUREMENT


class SevGuestError(TeeUnavailable):
    """The SEV-SNP firmware or the hypervisor refused a guest request."""


# --- packing -----------------------------------------------------------------------------


def pack_report_req(report_data: bytes, vmpl: int = 0) -> bytes:
    """struct snp_report_req { u8 user_data[64]; u32 vmpl; u8 rsvd[28]; } (96 bytes)."""
    if len(report_data) != 64:
        raise ValueError(f"report data must be 64 bytes, got {len(report_data)}")
    return struct.pack("<64sI28x", report_data, vmpl)


def pack_ext_report_req(report_data: bytes, certs_address: int, certs_len: int) -> bytes:
    """struct snp_ext_report_req { snp_report_req data; u64 certs_address; u32 certs_len; }
    (padded to 112 bytes by the u64 alignment)."""
    return struct.pack("<96sQI4x", pack_report_req(report_data), certs_address, certs_len)


def unpack_ext_report_certs_len(req: bytes) -> int:
    """The certs_len the kernel writes back when the buffer was too small."""
    return int(struct.unpack_from("<I", req, 104)[0])


def pack_derived_key_req(
    root_key_select: int = ROOT_KEY_VCEK,
    guest_field_select: int = SEALING_FIELDS,
    vmpl: int = 0,
    guest_svn: int = 0,
    tcb_version: int = 0,
) -> bytes:
    """struct snp_derived_key_req { u32 root_key_select; u32 rsvd; u64 guest_field_select;
    u32 vmpl; u32 guest_svn; u64 tcb_version; } (32 bytes)."""
    return struct.pack(
        "<IIQIIQ", root_key_select, 0, guest_field_select, vmpl, guest_svn, tcb_version
    )


def pack_guest_request(
    req_address: int, resp_address: int, msg_version: int = MSG_VERSION
) -> bytes:
    """struct snp_guest_request_ioctl with exitinfo2 zeroed."""
    return struct.pack(GUEST_REQUEST_FORMAT, msg_version, req_address, resp_address, 0)


# --- parsing -----------------------------------------------------------------------------


def unpack_guest_request_errors(ioctl_arg: bytes) -> tuple[int, int]:
    """(fw_error, vmm_error) from the exitinfo2 the kernel wrote back."""
    (exitinfo2,) = struct.unpack_from("<Q", ioctl_arg, 24)
    return exitinfo2 & 0xFFFFFFFF, exitinfo2 >> 32


def parse_report_resp(resp: bytes) -> bytes:
    """MSG_REPORT_RSP { u32 status; u32 report_size; u8 rsvd[24]; report } -> report."""
    status, size = struct.unpack_from("<II", resp, 0)
    if status != 0:
        raise SevGuestError(
            f"SEV-SNP firmware refused the report request (status {status:#x}); "
            "status 0x16 means invalid parameters (e.g. VMPL)"
        )
    if size != snp.REPORT_SIZE or 32 + size > len(resp):
        raise SevGuestError(f"SEV-SNP firmware returned a report of {size} bytes, expected 1184")
    return bytes(resp[32 : 32 + size])


def parse_derived_key_resp(resp: bytes) -> bytes:
    """MSG_KEY_RSP { u32 status; u8 rsvd[28]; u8 key[32]; } -> key."""
    (status,) = struct.unpack_from("<I", resp, 0)
    if status != 0:
        raise SevGuestError(
            f"SEV-SNP firmware refused the key derivation (status {status:#x}); "
            "status 0x16 means an invalid field selection or VMPL"
        )
    return bytes(resp[32:64])


def parse_cert_table(blob: bytes) -> dict[str, bytes]:
    """The certificates the host attached to an extended report (`formats.snp`)."""
    try:
        return snp.parse_cert_table(blob)
    except EvidenceError as exc:
        raise SevGuestError(str(exc)) from None


def checked_report(report: bytes, report_data: bytes) -> bytes:
    """The report, once it parses as clients parse it and carries `report_data`."""
    try:
        parsed = snp.parse_report(report)
    except EvidenceError as exc:
        raise SevGuestError(
            f"the SEV-SNP firmware returned a report clients refuse ({exc})"
        ) from None
    if parsed.report_data != report_data:
        raise SevGuestError("the SEV-SNP report does not carry the requested report data")
    return report


def collateral_from_certs(certs: dict[str, bytes]) -> dict[str, bytes]:
    """Evidence collateral (vcek.der, ask_ark.pem) from a parsed certificate table."""
    collateral: dict[str, bytes] = {}
    endorsement = certs.get("vcek") or certs.get("vlek")
    if endorsement:
        collateral[files.VLEK if "vcek" not in certs else files.VCEK] = endorsement
    chain = [certs[name] for name in ("ask", "ark") if certs.get(name)]
    if chain:
        collateral[files.ASK_ARK] = b"".join(
            x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM) for der in chain
        )
    return collateral


# --- the device --------------------------------------------------------------------------


def missing_device_error(device: Path) -> TeeUnavailable:
    return TeeUnavailable(
        f"{device} not found: this is not an SEV-SNP guest, or the sev-guest driver is not "
        "loaded (try `modprobe sev-guest`); on Linux >= 6.7 configfs-tsm is an alternative"
    )


class SevGuestProvider:
    """SEV-SNP attestation reports (with the host-provided certificates) from /dev/sev-guest."""

    kind = "sev-snp"

    def __init__(
        self,
        device: Path = Path("/dev/sev-guest"),
        *,
        vmpl: int = 0,
        kds: KdsVcekFetcher | None = None,
    ) -> None:
        self.device = Path(device)
        self.vmpl = vmpl
        self._kds = kds
        if not self.device.exists():
            raise missing_device_error(self.device)
        self._lock = threading.Lock()

    def _ioctl(self, request: int, req: ctypes.Array[ctypes.c_char], resp_size: int) -> bytes:
        resp = ctypes.create_string_buffer(resp_size)
        arg = bytearray(pack_guest_request(ctypes.addressof(req), ctypes.addressof(resp)))
        with self._lock:
            fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, request, arg, True)
            except OSError as exc:
                fw_error, vmm_error = unpack_guest_request_errors(bytes(arg))
                raise _ioctl_error(self.device, exc, fw_error, vmm_error) from None
            finally:
                os.close(fd)
        return resp.raw

    def report(self, report_data: bytes) -> bytes:
        req = ctypes.create_string_buffer(pack_report_req(report_data, self.vmpl))
        return parse_report_resp(self._ioctl(SNP_GET_REPORT, req, REPORT_RESP_SIZE))

    def extended_report(self, report_data: bytes) -> tuple[bytes, dict[str, bytes]]:
        """The report and the certificate table the host attached (empty when none)."""
        certs_len = 4 * PAGE_SIZE
        for _ in range(2):
            certs = ctypes.create_string_buffer(certs_len)
            req = ctypes.create_string_buffer(
                pack_ext_report_req(report_data, ctypes.addressof(certs), certs_len)
            )
            try:
                resp = self._ioctl(SNP_GET_EXT_REPORT, req, REPORT_RESP_SIZE)
            except _BufferTooSmall:
                # The kernel wrote the needed length back into the request.
                certs_len = unpack_ext_report_certs_len(req.raw)
                continue
            return parse_report_resp(resp), parse_cert_table(certs.raw)
        raise SevGuestError("the SEV-SNP host keeps asking for a larger certificate buffer")

    def evidence(self, report_data: bytes) -> Evidence:
        try:
            report, certs = self.extended_report(report_data)
        except SevGuestError:
            # Hosts without extended-report support: plain report, VCEK from AMD KDS.
            report, certs = self.report(report_data), {}
        report = checked_report(report, report_data)
        collateral = collateral_from_certs(certs)
        if self._kds is not None:
            collateral = self._kds.complete(report, collateral)
        return Evidence(self.kind, report, collateral)

    def collateral_valid_until(self) -> int | None:
        # VCEK certificates are valid for years and are not refreshed by the server.
        return None

    def derived_key(self, guest_field_select: int = SEALING_FIELDS) -> bytes:
        req = ctypes.create_string_buffer(
            pack_derived_key_req(ROOT_KEY_VCEK, guest_field_select, self.vmpl)
        )
        return parse_derived_key_resp(self._ioctl(SNP_GET_DERIVED_KEY, req, DERIVED_KEY_RESP_SIZE))

    def sealing_key(self) -> bytes | None:
        return derive_sealing_key(self.derived_key())


class _BufferTooSmall(SevGuestError):
    pass


def _ioctl_error(device: Path, exc: OSError, fw_error: int, vmm_error: int) -> SevGuestError:
    if vmm_error == SNP_GUEST_VMM_ERR_INVALID_LEN:
        return _BufferTooSmall("certificate buffer too small")
    return SevGuestError(
        f"ioctl on {device} failed ({exc.strerror}; firmware error {fw_error:#x}, "
        f"hypervisor error {vmm_error:#x}); check that the process may open {device} "
        "(root or the sev-guest group)"
    )
