"""AMD SEV-SNP wire formats: the ATTESTATION_REPORT, TCB_VERSION, the guest policy bits, the
GHCB certificate table and the name of a chip's VCEK at AMD KDS.

Layouts follow the AMD SEV-SNP ABI specification (tables "ATTESTATION_REPORT structure",
"TCB_VERSION structure", "GUEST_POLICY structure") and the GHCB specification ("SNP Extended
Guest Request"). Only Milan/Genoa TCB_VERSION layout is known here (Turin's differs).

Decided once for both sides: a report is exactly 1184 bytes of version 2 or later. Trailing
bytes are not covered by the signature, so a server that got more (a certificate table, a
response header) must cut them before publishing, and a client refuses them.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from blindfold.errors import EvidenceError

REPORT_SIZE = 0x4A0  # 1184 bytes: 0x2A0 signed body + 0x200 signature block
SIGNED_LEN = 0x2A0
SIGNATURE_OFFSET = 0x2A0
SIG_COMPONENT_LEN = 72  # R and S are each 72-byte little-endian integers (zero-padded P-384)
SIG_ALGO_ECDSA_P384_SHA384 = 1
MIN_REPORT_VERSION = 2
REPORT_DATA = slice(0x50, 0x90)
SIGNING_KEY_VCEK = 0  # KEY_INFO.SIGNING_KEY: 0 VCEK, 1 VLEK, 7 none

# GUEST_POLICY bits.
POLICY_SMT = 16
POLICY_MIGRATE_MA = 18
POLICY_DEBUG = 19
POLICY_SINGLE_SOCKET = 20

TCB_PARTS = ("bootloader", "tee", "snp", "microcode")


@dataclass(frozen=True)
class Tcb:
    """The four security patch levels of a Milan/Genoa TCB_VERSION (u64, little-endian):
    byte 0 boot loader, byte 1 PSP OS (TEE), bytes 2-5 reserved, byte 6 SNP firmware,
    byte 7 microcode."""

    bootloader: int
    tee: int
    snp: int
    microcode: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> Tcb:
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def describe(self) -> str:
        return f"bl={self.bootloader} tee={self.tee} snp={self.snp} ucode={self.microcode}"


@dataclass(frozen=True)
class Report:
    """The fields of an ATTESTATION_REPORT that verification and policy need."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: Tcb
    platform_info: int
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: Tcb
    chip_id: bytes
    committed_tcb: Tcb
    current_version: tuple[int, int, int]
    committed_version: tuple[int, int, int]
    launch_tcb: Tcb
    signature_r: int
    signature_s: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_LEN]

    @property
    def debug(self) -> bool:
        return bool(self.policy >> POLICY_DEBUG & 1)


def parse_report(evidence: bytes) -> Report:
    """Parses an SNP attestation report; raises EvidenceError if it is not one."""
    if not isinstance(evidence, (bytes, bytearray)):
        raise EvidenceError(
            f"SEV-SNP evidence must be bytes, found {type(evidence).__name__}. Pass the raw "
            "attestation report (1184 bytes) as published at GET /v2/attestation."
        )
    raw = bytes(evidence)
    if len(raw) < REPORT_SIZE:
        raise EvidenceError(
            f"SEV-SNP report is truncated: expected {REPORT_SIZE} bytes, found {len(raw)}. "
            "Fetch the evidence again; a proxy may have cut the response."
        )
    if len(raw) > REPORT_SIZE:
        raise EvidenceError(
            f"SEV-SNP report has trailing data: expected {REPORT_SIZE} bytes, found {len(raw)}. "
            "Send the bare ATTESTATION_REPORT, without a certificate table or MSG_REPORT_RSP "
            "header."
        )
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x00)
    if version < MIN_REPORT_VERSION:
        raise EvidenceError(
            f"SEV-SNP report version: expected {MIN_REPORT_VERSION} or later, found {version}. "
            "This is not an SNP attestation report (or comes from pre-release firmware); "
            "update the host's SEV firmware."
        )
    vmpl, signature_algo = struct.unpack_from("<II", raw, 0x30)
    (platform_info,) = struct.unpack_from("<Q", raw, 0x40)
    (key_info,) = struct.unpack_from("<I", raw, 0x48)
    return Report(
        raw=raw,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=Tcb.from_bytes(raw[0x38:0x40]),
        platform_info=platform_info,
        signing_key=(key_info >> 2) & 0x7,
        report_data=raw[REPORT_DATA],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=Tcb.from_bytes(raw[0x180:0x188]),
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=Tcb.from_bytes(raw[0x1E0:0x1E8]),
        current_version=(raw[0x1EA], raw[0x1E9], raw[0x1E8]),
        committed_version=(raw[0x1EE], raw[0x1ED], raw[0x1EC]),
        launch_tcb=Tcb.from_bytes(raw[0x1F0:0x1F8]),
        signature_r=_le_int(raw, SIGNATURE_OFFSET),
        signature_s=_le_int(raw, SIGNATURE_OFFSET + SIG_COMPONENT_LEN),
    )


def _le_int(raw: bytes, offset: int) -> int:
    return int.from_bytes(raw[offset : offset + SIG_COMPONENT_LEN], "little")


# --- the VCEK's name at AMD KDS (and in a VCEK cache folder) ---


def kds_vcek_path(product: str, chip_id: bytes, tcb: Tcb) -> str:
    """The AMD KDS path of a chip's VCEK at a TCB: `/vcek/v1/{product}/{chip_id hex}?...`."""
    return (
        f"/vcek/v1/{product}/{chip_id.hex()}?blSPL={tcb.bootloader}&teeSPL={tcb.tee}"
        f"&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    )


def vcek_cache_name(chip_id: bytes, tcb: Tcb) -> str:
    """The file name of a VCEK in a cache folder: the KDS parameters, so a file fetched from
    KDS can be stored under it unchanged, e.g. ``d49554...1eb6-3-0-8-115.der``."""
    return f"{chip_id.hex()}-{tcb.bootloader}-{tcb.tee}-{tcb.snp}-{tcb.microcode}.der"


# --- the GHCB certificate table of an extended report ---

GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
CERT_NAMES = {GUID_VCEK: "vcek", GUID_VLEK: "vlek", GUID_ASK: "ask", GUID_ARK: "ark"}
_CERT_ENTRY = struct.Struct("<16sII")


def _guid(raw: bytes) -> uuid.UUID:
    # The GHCB table stores GUIDs in RFC 4122 byte order (libuuid's uuid_parse, as the
    # AMD host tools write them); accept the mixed-endian EFI order too.
    direct = uuid.UUID(bytes=raw)
    return direct if direct in CERT_NAMES else uuid.UUID(bytes_le=raw)


def parse_cert_table(blob: bytes) -> dict[str, bytes]:
    """Certificates of an extended report, by name ("vcek", "vlek", "ask", "ark", or the GUID),
    from the GHCB table { guid[16]; u32 offset; u32 length; }... ended by an all-zero entry."""
    certs: dict[str, bytes] = {}
    for start in range(0, len(blob) - _CERT_ENTRY.size + 1, _CERT_ENTRY.size):
        raw, offset, length = _CERT_ENTRY.unpack_from(blob, start)
        if raw == bytes(16) and offset == 0 and length == 0:
            return certs
        if offset + length > len(blob):
            raise EvidenceError(
                f"the SEV-SNP certificate table points past its blob ({offset}+{length} > "
                f"{len(blob)}); the host's certificate configuration is corrupt"
            )
        guid = _guid(raw)
        certs[CERT_NAMES.get(guid, str(guid))] = bytes(blob[offset : offset + length])
    if blob.strip(b"\x00"):
        raise EvidenceError("the SEV-SNP certificate table has no terminating entry")
    return certs
