"""The VCEK of this chip from AMD's Key Distribution Service (KDS), for SEV-SNP guests whose
host did not provision certificates (no extended report, or an empty certificate table).

This module owns the KDS URL layout and the VCEK cache. A VCEK is public: it is fetched from
`{base}/vcek/v1/{product}/{chip_id hex}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..` (the
report's CHIP_ID and REPORTED_TCB), kept in memory, and, with a cache folder, on disk under
the name clients look up (`formats.snp.vcek_cache_name`). Neither KDS nor the
cache is trusted: a VCEK is used only once the report it must endorse verifies under it and
its chain reaches the AMD root bundled with Blindfold, exactly as clients check it. A cached
copy that does not verify is fetched again.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path

from blindfold.attestation import sevsnp
from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.formats import snp
from blindfold.errors import EvidenceError
from blindfold.server.tee.errors import TeeUnavailable
from blindfold.server.tee.pcs import Fetch, urllib_fetch

logger = logging.getLogger("blindfold.tee")

AMD_KDS_URL = "https://kdsintf.amd.com"
# The product lines whose ARK/ASK Blindfold bundles (and so can verify), tried in order.
PRODUCTS = ("Milan", "Genoa")


class KdsVcekFetcher:
    """The VCEK that endorses a report, from memory, the cache folder, or AMD KDS."""

    def __init__(
        self,
        base_url: str = AMD_KDS_URL,
        *,
        cache_dir: Path | None = None,
        fetch: Fetch = urllib_fetch,
        products: Sequence[str] = PRODUCTS,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._fetch = fetch
        self._products = tuple(products)
        self._now = now
        self._memory: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def complete(self, report: bytes, collateral: dict[str, bytes]) -> dict[str, bytes]:
        """The collateral, with this chip's VCEK added when the host provided no endorsement
        key (clients then use the bundled ASK/ARK)."""
        if files.VCEK in collateral or files.VLEK in collateral:
            return collateral
        return {**collateral, files.VCEK: self.vcek(report)}

    def vcek(self, report: bytes) -> bytes:
        """DER of the VCEK for this report's chip and TCB; TeeUnavailable if none verifies."""
        try:
            parsed = snp.parse_report(report)
        except EvidenceError as exc:
            raise TeeUnavailable(f"the SEV-SNP report is malformed ({exc})") from None
        name = snp.vcek_cache_name(parsed.chip_id, parsed.reported_tcb)
        with self._lock:
            known = self._memory.get(name)
            if known is not None:
                return known
            cached = self._read_cache(name)
            if cached is not None and self._endorses(cached, report):
                self._memory[name] = cached
                return cached
            fetched = self._download(parsed, report)
            self._write_cache(name, fetched)
            self._memory[name] = fetched
            return fetched

    def _endorses(self, vcek: bytes, report: bytes) -> bool:
        try:
            sevsnp.verify(report, {files.VCEK: vcek}, int(self._now()))
        except EvidenceError as exc:
            logger.warning("a VCEK from cache or AMD KDS does not verify this report: %s", exc)
            return False
        return True

    def _download(self, parsed: snp.Report, report: bytes) -> bytes:
        problems: list[str] = []
        for product in self._products:
            url = self.base_url + snp.kds_vcek_path(product, parsed.chip_id, parsed.reported_tcb)
            try:
                body, _ = self._fetch(url)
            except urllib.error.HTTPError as exc:
                problems.append(f"{product}: HTTP {exc.code}")
                continue  # KDS answers 4xx for a chip of another product line
            except OSError as exc:
                raise TeeUnavailable(
                    f"cannot reach AMD KDS at {self.base_url} for this chip's VCEK ({exc}); "
                    "allow the guest to reach it, or have the host provision the SEV-SNP "
                    "certificates (extended report)"
                ) from None
            if self._endorses(body, report):
                logger.info("fetched the VCEK of this chip from AMD KDS (%s)", product)
                return body
            problems.append(f"{product}: the certificate does not verify this report")
        raise TeeUnavailable(
            f"AMD KDS at {self.base_url} has no VCEK that verifies this report "
            f"({'; '.join(problems)}); have the host provision the SEV-SNP certificates"
        )

    def _read_cache(self, name: str) -> bytes | None:
        if self.cache_dir is None:
            return None
        try:
            return (self.cache_dir / name).read_bytes()
        except OSError:
            return None

    def _write_cache(self, name: str, vcek: bytes) -> None:
        if self.cache_dir is None:
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-vcek-")
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(vcek)
            os.replace(temporary, self.cache_dir / name)
        except OSError as exc:  # a cache, not a requirement
            logger.warning("cannot cache the VCEK in %s: %s", self.cache_dir, exc.strerror)
