"""SEV-SNP guests whose host provisioned no certificates: the server fetches its chip's VCEK
from AMD KDS (here a fake KDS on loopback serving the real VCEK of a recorded Milan report),
caches it, and uses only a VCEK under which the report verifies."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_tee_providers import FakeKernelFs

from blindfold.attestation.formats.snp import parse_report, vcek_cache_name
from blindfold.attestation.verdict import Evidence
from blindfold.attestation.verify import verify_evidence
from blindfold.server.tee.configfs_tsm import ConfigfsTsmProvider
from blindfold.server.tee.errors import TeeUnavailable
from blindfold.server.tee.kds import KdsVcekFetcher

VECTOR = Path("sev-snp") / "virtee-milan"
VERIFY_AT = 1704067200  # the vector's verification time (manifest.json)


class FakeKds:
    """AMD KDS's VCEK endpoint on loopback: `certs` maps a request path (with query) to DER."""

    def __init__(self, certs: dict[str, bytes]) -> None:
        self.certs = certs
        self.requests: list[str] = []
        kds = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kds.requests.append(self.path)
                body = kds.certs.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def milan(vectors_dir: Path) -> tuple[bytes, bytes, str]:
    """The recorded report, its VCEK, and the KDS path AMD serves that VCEK under."""
    report = (vectors_dir / VECTOR / "report.bin").read_bytes()
    vcek = (vectors_dir / VECTOR / "vcek.der").read_bytes()
    parsed = parse_report(report)
    tcb = parsed.reported_tcb
    path = (
        f"/vcek/v1/Milan/{parsed.chip_id.hex()}?blSPL={tcb.bootloader}&teeSPL={tcb.tee}"
        f"&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    )
    return report, vcek, path


@pytest.fixture
def kds(milan: tuple[bytes, bytes, str]) -> Iterator[FakeKds]:
    _, vcek, path = milan
    server = FakeKds({path: vcek})
    yield server
    server.close()


def _fetcher(url: str, cache: Path, **kw: object) -> KdsVcekFetcher:
    return KdsVcekFetcher(url, cache_dir=cache, now=lambda: VERIFY_AT, **kw)  # type: ignore[arg-type]


def test_provider_without_host_certificates_ships_the_vcek_from_kds(
    tmp_path: Path, milan: tuple[bytes, bytes, str], kds: FakeKds
) -> None:
    report, vcek, path = milan
    cache = tmp_path / "cache"
    provider = ConfigfsTsmProvider(
        "sev-snp",
        tmp_path,
        fs=FakeKernelFs("sev_guest", report, None),  # no auxblob: the host provided nothing
        sev_guest_device=tmp_path / "no-sev-guest",
        kds=_fetcher(kds.url, cache, products=("Genoa", "Milan")),
    )
    evidence = provider.evidence(report[0x50:0x90])
    assert evidence.collateral["vcek.der"] == vcek
    # What a client checks, with the collateral exactly as the server publishes it.
    verdict = verify_evidence(Evidence("sev-snp", report, evidence.collateral), VERIFY_AT)
    assert verdict.kind == "sev-snp"
    assert kds.requests == [path.replace("/Milan/", "/Genoa/"), path]  # Genoa: 404, then Milan
    parsed = parse_report(report)
    assert (cache / vcek_cache_name(parsed.chip_id, parsed.reported_tcb)).read_bytes() == vcek
    provider.evidence(report[0x50:0x90])
    assert len(kds.requests) == 2  # kept in memory


def test_cached_vcek_is_used_and_a_damaged_one_fetched_again(
    tmp_path: Path, milan: tuple[bytes, bytes, str], kds: FakeKds
) -> None:
    report, vcek, _ = milan
    cache = tmp_path / "cache"
    assert _fetcher(kds.url, cache).vcek(report) == vcek
    assert len(kds.requests) == 1
    assert _fetcher(kds.url, cache).vcek(report) == vcek  # a restart: from the cache folder
    assert len(kds.requests) == 1
    (cached,) = cache.iterdir()
    damaged = bytearray(vcek)
    damaged[-10] ^= 0x01  # the host edits the cache: its signature no longer verifies
    cached.write_bytes(bytes(damaged))
    assert _fetcher(kds.url, cache).vcek(report) == vcek
    assert len(kds.requests) == 2 and cached.read_bytes() == vcek


def test_kds_answer_that_does_not_verify_the_report_is_refused(
    tmp_path: Path, vectors_dir: Path, milan: tuple[bytes, bytes, str]
) -> None:
    report, _, path = milan
    other = (vectors_dir / "sev-snp").glob("*/vcek.der")
    wrong = next(p.read_bytes() for p in other if p.parent.name != VECTOR.name)
    lying = FakeKds({path: wrong})
    try:
        with pytest.raises(TeeUnavailable, match="no VCEK that verifies this report"):
            _fetcher(lying.url, tmp_path / "cache").vcek(report)
    finally:
        lying.close()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_unreachable_kds_is_a_clear_error(tmp_path: Path, milan: tuple[bytes, bytes, str]) -> None:
    report, _, _ = milan
    gone = FakeKds({})
    gone.close()
    with pytest.raises(TeeUnavailable, match="cannot reach AMD KDS"):
        _fetcher(gone.url, tmp_path).vcek(report)
