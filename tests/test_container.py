"""The server's container image (`Containerfile`), built, run and attested as an operator and
a user would: podman builds it on a Debian base made here with debootstrap (no image registry
is reachable from these machines), runs it, its health check answers, and the SDK on the host
attests the server inside it under the default policy, which expects the measurement of this
checkout's code: the image runs exactly this code.

Marked `container`. Needs root and Debian's podman, runc and debootstrap (installed with
apt-get when missing); skipped, with the reason, where podman cannot run. The debootstrap base
(a tar file, ~130 MB) is cached in $BLINDFOLD_CONTAINER_CACHE (default
~/.cache/blindfold/container); podman's storage lives in the test's temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from conftest import PROJECT_ROOT, free_port
from helpers import connect
from onnx_models import identity_model
from server_process import debian_tool

pytestmark = pytest.mark.container

# What the slim Python base needs: python3 able to make a venv, and CA certificates.
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates"]
HOST_TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE = "localhost/blindfold:test"
MAX_IMAGE_BYTES = 500 * 10**6  # the image is ~370 MB: base ~130 MB, onnxruntime and friends


def _run(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def _install_host_tools() -> None:
    """apt-get installs podman, runc and debootstrap when missing, or skips saying why."""
    for tool, package in HOST_TOOLS.items():
        debian_tool(tool, package)


def _os_release() -> dict[str, str]:
    fields = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        fields[key] = value.strip().strip('"')
    return fields


def _debian_mirror(suite: str) -> str:
    """The machine's configured apt mirror for `suite` (deb822 or one-line sources)."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (line.partition(":") for line in stanza.splitlines())
                if not key.startswith("#")
            )
            if (
                "deb" in fields.get("Types", "").split()
                and suite in fields.get("Suites", "").split()
            ):
                return fields["URIs"].split()[0]
    one_line = Path("/etc/apt/sources.list")
    if one_line.is_file():
        for line in one_line.read_text().splitlines():
            match = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s", line + " ")
            if match and match.group(2) == suite:
                return match.group(1)
    return "http://deb.debian.org/debian"


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "blindfold" / "container"
    return Path(os.environ.get("BLINDFOLD_CONTAINER_CACHE", default))


def _base_tarball(scratch: Path) -> Path:
    """A minimal Debian root file system with Python, as a tar file: made with debootstrap
    from the machine's apt mirror once, then reused while its recipe stays the same."""
    release = _os_release()
    if release.get("ID") != "debian" or not release.get("VERSION_CODENAME"):
        pytest.skip("the base image is made with debootstrap of the host's Debian release")
    suite = release["VERSION_CODENAME"]
    mirror = _debian_mirror(suite)
    # The CA bundle goes into the base because pip inside the build reaches PyPI through
    # whatever TLS interception the machine has; a new bundle makes a new base.
    recipe = json.dumps(
        [suite, mirror, BASE_PACKAGES, hashlib.sha256(CA_BUNDLE.read_bytes()).hexdigest()]
    )
    cached = _cache_dir() / f"debian-{suite}-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.tar"
    if cached.is_file():
        return cached
    rootfs = scratch / "rootfs"
    command = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        suite,
        str(rootfs),
        mirror,
    ]
    result = _run(command, timeout=1800)
    if result.returncode != 0:
        pytest.skip(f"debootstrap from {mirror} failed: {result.stdout.strip()[-500:]}")
    # What a slim image leaves out: package caches and lists, documentation, translations.
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc"):
        for path in (rootfs / folder).glob("*"):
            if path.is_file() or path.is_symlink():
                path.unlink()
    for folder in ("usr/share/man", "usr/share/locale"):
        shutil.rmtree(rootfs / folder, ignore_errors=True)
    shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
    (rootfs / "etc/pip.conf").write_text(f"[global]\ncert = {CA_BUNDLE}\n")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{secrets.token_hex(4)}.partial")
    with tarfile.open(partial, "w") as archive:
        archive.add(rootfs, arcname=".")
    os.replace(partial, cached)  # concurrent runs each write whole files
    shutil.rmtree(rootfs, ignore_errors=True)
    return cached


@dataclass
class Podman:
    """podman with its configuration and storage in one temporary folder."""

    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run(["podman", *args], timeout=timeout, env=self.env)

    def ok(self, *args: str, timeout: float = 120) -> str:
        result = self(*args, timeout=timeout)
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr[-3000:]}"
        return result.stdout


def _podman_in(folder: Path) -> Podman:
    # As BUILD-NOTES found: runc (crun refuses mixed cgroup v1/v2), ulimits within the
    # sandbox's hard limits, storage in a temporary folder, host networking.
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 16384)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 4096)
    (folder / "containers.conf").write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        'netns = "host"\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'tmp_dir = "{folder / "tmp"}"\n'
    )
    (folder / "storage.conf").write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{folder / "storage"}"\n'
        f'runroot = "{folder / "run"}"\n'
    )
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(folder / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(folder / "storage.conf"),
    }
    return Podman(env)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """podman that can run containers here, with the base image imported as
    localhost/blindfold-base; skips with podman's own words when it cannot run."""
    if os.geteuid() != 0:
        pytest.skip("the container test runs podman as root (rootless podman is not set up here)")
    _install_host_tools()
    folder = tmp_path_factory.mktemp("podman")
    tarball = _base_tarball(folder)
    runner = _podman_in(folder)
    try:
        for probe in (
            ("import", str(tarball), "localhost/blindfold-base:test"),
            ("run", "--rm", "localhost/blindfold-base:test", "python3", "-c", "1"),
        ):
            result = runner(*probe, timeout=600)
            if result.returncode != 0:
                reason = result.stderr.strip()[-800:]
                pytest.skip(f"podman cannot {probe[0]} here: {reason}")
        yield runner
    finally:
        runner("rm", "--all", "--force", timeout=120)
        runner("system", "reset", "--force", timeout=300)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """The image built from this checkout's Containerfile on the local base."""
    podman.ok(
        "build",
        "--format",
        "docker",  # the OCI format has no HEALTHCHECK
        "--network",
        "host",
        "--build-arg",
        "BASE=localhost/blindfold-base:test",
        "--tag",
        IMAGE,
        "--file",
        str(PROJECT_ROOT / "Containerfile"),
        str(PROJECT_ROOT),
        timeout=1800,
    )
    return IMAGE


@dataclass
class Container:
    podman: Podman
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log(self) -> str:
        result = self.podman("logs", self.name)
        return result.stdout + result.stderr


def _start(
    podman: Podman, image: str, *options: str, server_args: tuple[str, ...] = ()
) -> Container:
    """Runs the image on host networking, on a free loopback port, and waits until its own
    health check reports healthy. `options` go to podman run, `server_args` to the server."""
    name = f"blindfold-test-{secrets.token_hex(4)}"
    port = free_port()
    podman.ok(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--env",
        "BLINDFOLD_HOST=127.0.0.1",
        "--env",
        f"BLINDFOLD_PORT={port}",
        *options,
        image,
        "--tee",
        "simulation",
        "--open-upload",
        *server_args,
    )
    container = Container(podman, name, port)
    deadline = time.monotonic() + 120
    while podman("healthcheck", "run", name).returncode != 0:
        state = podman.ok("inspect", "--format", "{{.State.Status}}", name).strip()
        assert state == "running", f"the container stopped ({state}):\n{container.log()}"
        assert time.monotonic() < deadline, f"never healthy:\n{container.log()}"
        time.sleep(0.5)
    return container


def test_image_is_a_small_non_root_blindfold_serve_with_a_health_check(
    podman: Podman, image: str
) -> None:
    config = json.loads(podman.ok("image", "inspect", image))[0]
    assert config["Config"]["User"] == "10001:10001"
    assert config["Config"]["Entrypoint"] == ["blindfold", "serve"]
    assert "/v2/health/ready" in " ".join(config["Healthcheck"]["Test"])
    assert config["Size"] < MAX_IMAGE_BYTES, config["Size"]
    # Nothing of the build stays behind: no pip, no sources.
    script = "for p in /build /opt/blindfold/bin/pip; do test -e $p && echo $p; done; true"
    assert podman.ok("run", "--rm", "--entrypoint", "sh", image, "-c", script) == ""


def test_the_sdk_attests_the_server_in_the_container_and_runs_a_model(
    podman: Podman, image: str
) -> None:
    """On a named volume for the store, as an operator runs it; the model survives a new
    container on the same volume."""
    volume = f"blindfold-test-store-{secrets.token_hex(4)}"
    options = ("--volume", f"{volume}:/var/lib/blindfold/store")
    store = ("--store", "/var/lib/blindfold/store")
    x = np.array([1.0, 2.0, 3.0], np.float32)
    container = _start(podman, image, *options, server_args=store)
    try:
        pid = podman.ok("inspect", "--format", "{{.State.Pid}}", container.name).strip()
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Uid:\s+10001\s", status, re.M), "the server does not run as 10001"
        # The default policy expects this checkout's own measurement.
        with connect(container.url) as client:
            assert client.attestation.verdict.kind == "simulation"
            model = client.upload_model(
                identity_model(TensorProto.FLOAT, [3]), name="boxed", public=True
            )
            np.testing.assert_array_equal(client.run_model("boxed", x)["y"], x)
        log = container.log()
        assert "model store: /var/lib/blindfold/store (sealed" in log
        confinement = [line for line in log.splitlines() if "model workers are confined" in line]
        assert len(confinement) == 1, log
        print(f"\nworker confinement in the container: {confinement[0]}")
        # A graceful stop on SIGTERM (the server is PID 1), not podman's SIGKILL.
        podman.ok("stop", "--time", "20", container.name)
        exit_code = podman.ok("inspect", "--format", "{{.State.ExitCode}}", container.name)
        assert exit_code.strip() == "0", container.log()
    finally:
        podman("rm", "--force", container.name)
    again = _start(podman, image, *options, server_args=store)
    try:
        with connect(again.url) as client:
            np.testing.assert_array_equal(client.run_model("boxed", x)["y"], x)
            client.delete_model("boxed", token=model.owner_token)
    finally:
        podman("rm", "--force", again.name)
        podman("volume", "rm", "--force", volume)


def test_where_the_runtime_refuses_user_namespaces_workers_say_they_lost_chroot(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """Docker's and Kubernetes' default seccomp profiles refuse unshare: the worker falls
    back to an empty working directory, keeps serving, and the log says so."""
    profile = tmp_path / "no-unshare.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["unshare"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
            }
        )
    )
    container = _start(podman, image, "--security-opt", f"seccomp={profile}")
    try:
        with connect(container.url) as client:
            model = client.upload_model(identity_model(TensorProto.INT64, [2]), name="unboxed")
            x = np.array([7, 8], np.int64)
            np.testing.assert_array_equal(client.run_model("unboxed", x)["y"], x)
            client.delete_model(model.name, token=model.owner_token)
        log = container.log()
        assert "WARNING blindfold.server: model workers are confined only to an empty" in log
        assert "chroot into an empty directory inside" not in log
    finally:
        podman("rm", "--force", container.name)
