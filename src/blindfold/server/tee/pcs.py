"""Intel DCAP collateral for SGX and TDX quotes, fetched from Intel PCS or a local PCCS.

This module owns the Intel PCS/PCCS URL layout and response headers: downloading TCB info,
QE identity, PCK CRL and root CA CRL with their issuer chains, and caching them (memory and
disk) until shortly before their nextUpdate. The quote's layout and the collateral files'
formats live in `attestation.formats`, shared with the client's verifier. The server ships
this collateral next to the quote so that clients can verify offline, without Intel.

The HTTP client is an injectable callable `fetch(url) -> (body, headers)` so that tests can
serve real Intel collateral from the attestation vector store.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blindfold.attestation.formats import collateral_files as files
from blindfold.attestation.formats import dcap
from blindfold.errors import EvidenceError
from blindfold.server.tee.errors import CollateralUnavailable, TeeUnavailable

log = logging.getLogger(__name__)

Fetch = Callable[[str], tuple[bytes, dict[str, str]]]

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
# Intel PCS has no rootcacrl endpoint; the root CA's CRL distribution point serves it.
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"


def urllib_fetch(url: str, timeout: float = 30.0) -> tuple[bytes, dict[str, str]]:
    """The default fetch: one HTTPS GET with the system trust store."""
    if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
        # urlopen would also read file: and custom schemes; collateral only comes over HTTP.
        raise CollateralUnavailable(
            f"collateral URL {url[:200]!r} is not http(s); give an https:// PCS or PCCS URL"
        )
    request = urllib.request.Request(url, headers={"Accept": "*/*"})  # noqa: S310 (checked above)
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (checked above)
        return response.read(), {k: v for k, v in response.headers.items()}


# --- the quote's platform ------------------------------------------------------------------


@dataclass(frozen=True)
class PckInfo:
    """The platform a quote's collateral is for: FMSPC (12 upper-case hex digits, as PCS
    expects) and the PCK CA that issued its PCK certificate ("processor" or "platform")."""

    fmspc: str
    ca: str


def read_quote(quote: bytes, kind: str) -> tuple[dcap.Quote, PckInfo]:
    """The quote a TEE returned, parsed exactly as clients parse it, and its platform.

    A quote clients would refuse (a version or TEE type they do not verify, a broken
    certification data) is refused here, at start, rather than published.
    """
    try:
        parsed = dcap.parse_quote(quote)
        dcap.require_kind(parsed, kind)
        pck = dcap.pck_certificate(parsed)
    except EvidenceError as exc:
        raise TeeUnavailable(
            f"the TEE returned a quote that clients refuse ({exc}); check the quoting "
            "enclave / QGS installation on this host"
        ) from None
    return parsed, PckInfo(pck.fmspc, pck.ca)


# --- collateral --------------------------------------------------------------------------


@dataclass(frozen=True)
class DcapCollateral:
    """The collateral files for one (TEE, FMSPC, CA) and when the first of them expires."""

    files: dict[str, bytes]
    valid_until: int


def _header(headers: dict[str, str], *names: str) -> bytes:
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in names:
        if name.lower() in lowered:
            return urllib.parse.unquote(lowered[name.lower()]).encode()
    raise CollateralUnavailable(
        f"the PCS/PCCS response lacks the {names[0]} header; is the URL an Intel PCS v4 "
        "compatible service?"
    )


def collateral_valid_until(collateral: dict[str, bytes]) -> int:
    """When the first piece of the collateral (or a certificate in it) expires, read as
    clients read it (`formats.collateral_files.validity_window`)."""
    return files.validity_window(files.dcap_qvl_json(collateral))[1]


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
    fetched = {
        "tcb_info.json": tcb_body,
        "tcb_info_issuer_chain.pem": _header(
            tcb_headers, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
        ),
        "qe_identity.json": qe_body,
        "qe_identity_issuer_chain.pem": _header(
            qe_headers, "SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"
        ),
        "pck_crl.der": files.crl_der(crl_body, files.PCK_CRL),
        "pck_crl_issuer_chain.pem": _header(crl_headers, "SGX-PCK-CRL-Issuer-Chain"),
        "root_ca_crl.der": files.crl_der(root_body, files.ROOT_CA_CRL),
    }
    try:
        fetched[files.DCAP_QVL_JSON] = files.assemble_dcap_qvl_json(fetched).encode()
        valid_until = collateral_valid_until(fetched)
    except EvidenceError as exc:
        raise CollateralUnavailable(
            f"the collateral served by {base} is malformed ({exc}); check the PCCS version"
        ) from None
    return DcapCollateral(fetched, valid_until)


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
            cached = {name: (directory / name).read_bytes() for name in files.PCS_FILES}
            cached[files.DCAP_QVL_JSON] = files.assemble_dcap_qvl_json(cached).encode()
            valid_until = collateral_valid_until(cached)
        except (OSError, EvidenceError):
            log.warning("ignoring unreadable collateral cache at %s", directory)
            return None
        return DcapCollateral(cached, valid_until)

    def _store_disk(self, pck: PckInfo, collateral: DcapCollateral) -> None:
        directory = self._dir(pck)
        if directory is None:
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name in files.PCS_FILES:
                # Write-then-rename so a crash never leaves a half-written cache file.
                tmp = directory / f".{name}.tmp"
                tmp.write_bytes(collateral.files[name])
                os.replace(tmp, directory / name)
        except OSError:
            log.warning("could not write the collateral cache at %s", directory, exc_info=True)
