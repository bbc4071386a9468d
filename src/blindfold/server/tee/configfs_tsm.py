"""TDX and SEV-SNP evidence through Linux configfs-tsm (/sys/kernel/config/tsm/report).

This module owns the configfs-tsm protocol (Documentation/ABI/testing/configfs-tsm): make a
private entry directory, write 64 bytes to `inblob`, read `outblob` (the TDX quote or SNP
report) and `auxblob` (the SNP certificate table), and use `generation` to detect that
another writer changed `inblob` between our write and our read. It attaches collateral:
Intel DCAP collateral for TDX (via `pcs`), VCEK/ASK/ARK for SNP when the host supplied them
(otherwise the VCEK from AMD KDS, via `kds`).

All file operations go through `TsmFilesystem`, whose default is plain file I/O, so tests
can play the kernel's part at the file-protocol level.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from blindfold.attestation.verdict import Evidence
from blindfold.server.tee.errors import TeeUnavailable
from blindfold.server.tee.kds import KdsVcekFetcher
from blindfold.server.tee.pcs import (
    INTEL_PCS_URL,
    CollateralCache,
    Fetch,
    read_quote,
    urllib_fetch,
)
from blindfold.server.tee.sev_guest import (
    SevGuestProvider,
    checked_report,
    collateral_from_certs,
    parse_cert_table,
)

log = logging.getLogger(__name__)

TsmKind = Literal["tdx", "sev-snp"]
EXPECTED_PROVIDER = {"tdx": "tdx_guest", "sev-snp": "sev_guest"}


class TsmFilesystem(Protocol):
    """The handful of file operations the configfs-tsm protocol needs."""

    def is_dir(self, path: Path) -> bool: ...
    def mkdir(self, path: Path) -> None: ...
    def rmdir(self, path: Path) -> None: ...
    def exists(self, path: Path) -> bool: ...
    def read(self, path: Path) -> bytes: ...
    def write(self, path: Path, data: bytes) -> None: ...


class RealFilesystem:
    """Plain file I/O; configfs attributes must be written in one write() call."""

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        path.rmdir()

    def exists(self, path: Path) -> bool:
        return path.exists()

    def read(self, path: Path) -> bytes:
        return path.read_bytes()

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")


class GenerationRace(TeeUnavailable):
    """Another writer changed the entry's inblob while we were producing evidence."""


def missing_root_error(root: Path) -> TeeUnavailable:
    return TeeUnavailable(
        f"configfs-tsm not found at {root}; is this a TDX/SEV-SNP confidential VM with Linux "
        ">= 6.7 and configfs mounted (`mount -t configfs none /sys/kernel/config`)?"
    )


class ConfigfsTsmProvider:
    """TDX quotes or SEV-SNP reports from configfs-tsm, with their collateral."""

    def __init__(
        self,
        kind: TsmKind,
        root: Path = Path("/sys/kernel/config/tsm/report"),
        *,
        pccs_url: str = INTEL_PCS_URL,
        cache_dir: Path | None = None,
        fetch: Fetch = urllib_fetch,
        sev_guest_device: Path = Path("/dev/sev-guest"),
        kds: KdsVcekFetcher | None = None,
        max_attempts: int = 3,
        fs: TsmFilesystem | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        if kind not in EXPECTED_PROVIDER:
            raise TeeUnavailable(f"configfs-tsm serves 'tdx' or 'sev-snp', not {kind!r}")
        self.kind: str = kind
        self.root = Path(root)
        self.fs: TsmFilesystem = fs or RealFilesystem()
        self.max_attempts = max_attempts
        self._sev_guest_device = Path(sev_guest_device)
        self._kds = kds
        if not self.fs.is_dir(self.root):
            raise missing_root_error(self.root)
        self._collateral = (
            CollateralCache("tdx", pccs_url, fetch=fetch, cache_dir=cache_dir, now=now)
            if kind == "tdx"
            else None
        )

    # --- the configfs-tsm protocol ---

    def _read_generation(self, entry: Path) -> int:
        return int(self.fs.read(entry / "generation").strip())

    def _attempt(self, entry: Path, report_data: bytes) -> tuple[bytes, bytes | None, str]:
        before = self._read_generation(entry)
        self.fs.write(entry / "inblob", report_data)
        outblob = self.fs.read(entry / "outblob")
        aux_path = entry / "auxblob"
        auxblob = self.fs.read(aux_path) if self.fs.exists(aux_path) else None
        provider = self.fs.read(entry / "provider").decode().strip()
        after = self._read_generation(entry)
        # Each inblob write increments generation; anything beyond our one write means
        # someone else wrote inblob and outblob may answer their report data.
        if after != before + 1:
            raise GenerationRace(
                f"configfs-tsm entry {entry} changed under us (generation {before} -> {after}, "
                "expected exactly one write); another process is writing to it"
            )
        return outblob, auxblob, provider

    def raw_evidence(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        """(outblob, auxblob) for 64 bytes of report data, retrying on generation races."""
        if len(report_data) != 64:
            raise ValueError(f"report data must be 64 bytes, got {len(report_data)}")
        entry = self.root / f"blindfold-{secrets.token_hex(8)}"
        try:
            self.fs.mkdir(entry)
        except OSError as exc:
            raise TeeUnavailable(
                f"cannot create {entry} ({exc.strerror}); the server needs write access to "
                "configfs-tsm (root or CAP_SYS_ADMIN)"
            ) from None
        try:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    outblob, auxblob, provider = self._attempt(entry, report_data)
                except GenerationRace:
                    if attempt == self.max_attempts:
                        raise GenerationRace(
                            f"configfs-tsm entry {entry} was written by another process in "
                            f"each of {self.max_attempts} attempts; find and stop the other "
                            "writer (entries are private by convention)"
                        ) from None
                    log.warning("configfs-tsm generation race on %s; retrying", entry)
                    continue
                self._check_provider(provider)
                return outblob, auxblob
        finally:
            try:
                self.fs.rmdir(entry)
            except OSError:
                log.warning("could not remove configfs-tsm entry %s", entry)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_provider(self, provider: str) -> None:
        expected = EXPECTED_PROVIDER[self.kind]
        if provider != expected:
            raise TeeUnavailable(
                f"configfs-tsm provider is {provider!r}, expected {expected!r} for "
                f"--tee {self.kind}; choose --tee auto or the matching kind"
            )

    # --- TeeProvider ---

    def evidence(self, report_data: bytes) -> Evidence:
        outblob, auxblob = self.raw_evidence(report_data)
        if self.kind == "tdx":
            return self._tdx_evidence(outblob, report_data)
        return self._snp_evidence(outblob, auxblob, report_data)

    def _tdx_evidence(self, quote: bytes, report_data: bytes) -> Evidence:
        parsed, platform = read_quote(quote, "tdx")
        if parsed.report_data != report_data:
            raise TeeUnavailable("the TDX quote does not carry the requested report data")
        if self._collateral is None:  # created for kind "tdx", the only caller
            raise TeeUnavailable("no Intel collateral source is configured for TDX quotes")
        collateral = self._collateral.get(platform)
        return Evidence(self.kind, quote, dict(collateral.files))

    def _snp_evidence(self, report: bytes, auxblob: bytes | None, report_data: bytes) -> Evidence:
        report = checked_report(report, report_data)
        certs = parse_cert_table(auxblob) if auxblob else {}
        collateral = collateral_from_certs(certs)
        if self._kds is not None:  # the host provided no VCEK: ask AMD KDS
            collateral = self._kds.complete(report, collateral)
        return Evidence(self.kind, report, collateral)

    def collateral_valid_until(self) -> int | None:
        return self._collateral.valid_until() if self._collateral is not None else None

    def sealing_key(self) -> bytes | None:
        # TDX has no sealing-key derivation; SNP derives one through /dev/sev-guest.
        if self.kind == "sev-snp" and self._sev_guest_device.exists():
            return SevGuestProvider(self._sev_guest_device).sealing_key()
        return None
