"""`--tee auto`: which TEE is this process running in, and the provider for a hardware kind.

This module owns the probing order and the mapping from a TEE kind to its hardware provider.
Probing only looks at files; it never asks the hardware for evidence, except for opening and
removing one configfs-tsm entry to read its `provider` when no device node gives it away.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blindfold.errors import ConfigurationError
from blindfold.server.tee.base import TeeProvider
from blindfold.server.tee.errors import TeeUnavailable

HARDWARE_KINDS = ("sgx", "tdx", "sev-snp", "nitro")


@dataclass(frozen=True)
class TeePaths:
    """Where each TEE shows itself; injectable so tests can probe fake trees."""

    gramine_attestation: Path = Path("/dev/attestation")
    configfs_tsm: Path = Path("/sys/kernel/config/tsm/report")
    tdx_guest: Path = Path("/dev/tdx_guest")
    sev_guest: Path = Path("/dev/sev-guest")
    nsm: Path = Path("/dev/nsm")
    cpuinfo: Path = Path("/proc/cpuinfo")


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _configfs_provider(root: Path) -> str | None:
    """The configfs-tsm provider name, by creating and removing a probe entry."""
    if not root.is_dir():
        return None
    entry = root / f"blindfold-probe-{secrets.token_hex(4)}"
    try:
        entry.mkdir()
    except OSError:
        return None
    try:
        return (entry / "provider").read_text().strip() or None
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            entry.rmdir()


def detect_tee(allow_simulation_fallback: bool, paths: TeePaths | None = None) -> str:
    """The kind of TEE this process runs in: "sgx", "tdx", "sev-snp", "nitro", or
    "simulation" when none is found and the fallback is allowed."""
    p = paths or TeePaths()
    # Gramine first: an SGX enclave may run on a host that also has other TEE devices.
    if (p.gramine_attestation / "quote").exists():
        return "sgx"
    flags = _cpu_flags(p.cpuinfo)
    if p.tdx_guest.exists() or "tdx_guest" in flags:
        return "tdx"
    if p.sev_guest.exists() or "sev_snp" in flags:
        return "sev-snp"
    provider = _configfs_provider(p.configfs_tsm)
    if provider == "tdx_guest":
        return "tdx"
    if provider == "sev_guest":
        return "sev-snp"
    if p.nsm.exists():
        return "nitro"
    if allow_simulation_fallback:
        return "simulation"
    raise TeeUnavailable(
        "no TEE found: looked for Gramine SGX "
        f"({p.gramine_attestation / 'quote'}), TDX ({p.tdx_guest}, configfs-tsm at "
        f"{p.configfs_tsm}), SEV-SNP ({p.sev_guest}) and Nitro ({p.nsm}). Run inside a TEE, "
        "or pass --tee simulation explicitly to run without protection"
    )


def make_hardware_provider(kind: str, **options: Any) -> TeeProvider:
    """The provider for a hardware TEE kind; `options` go to its constructor."""
    if kind == "sgx":
        from blindfold.server.tee.gramine import GramineSgxProvider

        return GramineSgxProvider(**options)
    if kind == "tdx":
        from blindfold.server.tee.configfs_tsm import ConfigfsTsmProvider

        return ConfigfsTsmProvider("tdx", **options)
    if kind == "sev-snp":
        return _sev_snp_provider(**options)
    if kind == "nitro":
        from blindfold.server.tee.nitro_nsm import NitroNsmProvider

        return NitroNsmProvider(**options)
    raise ConfigurationError(
        f"unknown hardware TEE kind {kind!r}; expected one of {', '.join(HARDWARE_KINDS)}"
    )


def _sev_snp_provider(**options: Any) -> TeeProvider:
    # configfs-tsm is the kernel's preferred interface (Linux >= 6.7); /dev/sev-guest
    # ioctls serve older guest kernels.
    from blindfold.server.tee.configfs_tsm import ConfigfsTsmProvider
    from blindfold.server.tee.sev_guest import SevGuestProvider

    options = dict(options)
    device = Path(options.pop("device", options.get("sev_guest_device", TeePaths.sev_guest)))
    if Path(options.get("root", TeePaths.configfs_tsm)).is_dir():
        options["sev_guest_device"] = device
        return ConfigfsTsmProvider("sev-snp", **options)
    return SevGuestProvider(device, kds=options.get("kds"))
