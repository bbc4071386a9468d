"""Fills deploy/gramine/blindfold.manifest.template for the interpreter that runs it.

This module owns the mapping from the template's `{{ placeholder }}` names to this
installation's paths: Gramine's own names (gramine.libos, gramine.runtimedir(),
python.stdlib, arch_libdir, entrypoint...) and Blindfold's (site-packages mounts and trusted
files, PYTHONPATH, enclave size). It does plain string substitution, as gramine-manifest
would with -D options, so building a manifest needs no Jinja.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from pathlib import Path

from blindfold.errors import ConfigurationError

# Debian/Ubuntu packages of Gramine install here; override with gramine_libdir=... otherwise.
DEFAULT_GRAMINE_LIBDIR = "/usr/lib/x86_64-linux-gnu/gramine"
# Packages whose install directories the enclave must import from.
REQUIRED_PACKAGES = ("blindfold", "onnxruntime", "numpy", "onnx", "cryptography", "starlette")

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.]*(?:\(\))?)\s*\}\}")


def package_site_dir(name: str) -> Path | None:
    """The directory on sys.path that holds package `name` (its parent directory)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    origin = Path(locations[0]) if locations else Path(spec.origin or "")
    return origin.resolve().parent if str(origin) else None


def distinct_roots(paths: Iterable[Path]) -> list[Path]:
    """Sorted unique directories, dropping those inside another: Gramine rejects two mounts
    at one path, and a trusted directory already covers its subdirectories."""
    unique = sorted({p.resolve() for p in paths})
    roots: list[Path] = []
    for path in unique:
        if not any(path.is_relative_to(root) for root in roots):
            roots.append(path)
    return roots


def site_package_dirs(packages: Iterable[str] = REQUIRED_PACKAGES) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    dirs = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])]
    dirs += [d for d in (package_site_dir(name) for name in packages) if d is not None]
    return [d for d in distinct_roots(dirs) if not d.is_relative_to(stdlib)]


def default_values(gramine_libdir: str = DEFAULT_GRAMINE_LIBDIR) -> dict[str, str]:
    site_dirs = site_package_dirs()
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return {
        "gramine.libos": f"{gramine_libdir}/libsysdb.so",
        "gramine.runtimedir()": f"{gramine_libdir}/runtime/glibc",
        "arch_libdir": f"/lib/{multiarch}",
        # The real interpreter, not a venv symlink: Gramine measures the file it loads.
        "entrypoint": os.path.realpath(sys.executable),
        "python.stdlib": str(Path(sysconfig.get_paths()["stdlib"]).resolve()),
        "python_path": ":".join(str(d) for d in site_dirs),
        "site_packages_mounts": "\n  ".join(
            f'{{ path = "{d}", uri = "file:{d}" }},' for d in site_dirs
        ),
        "site_packages_trusted_files": "\n  ".join(f'"file:{d}/",' for d in site_dirs),
        "log_level": "error",
        "enclave_size": "8G",
        "max_threads": "64",
        "omp_num_threads": "4",
        "isv_prod_id": "1",
        "isv_svn": "1",
    }


def render_manifest(
    template_text: str,
    overrides: Mapping[str, str] | None = None,
    *,
    gramine_libdir: str = DEFAULT_GRAMINE_LIBDIR,
) -> str:
    """The manifest with every placeholder filled; unknown placeholders are an error rather
    than silently left for Gramine to reject."""
    values = default_values(gramine_libdir)
    values.update(overrides or {})
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template_text)} - values.keys())
    if unknown:
        raise ConfigurationError(
            f"the manifest template uses unknown placeholders {unknown}; pass them in "
            "overrides or fix the template"
        )
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template_text)


def main(argv: list[str] | None = None) -> None:
    """`python -m blindfold.server.tee.gramine_manifest TEMPLATE [KEY=VALUE...]` prints the
    rendered manifest."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: gramine_manifest TEMPLATE [placeholder=value ...]")
    overrides = dict(arg.split("=", 1) for arg in args[1:])
    sys.stdout.write(render_manifest(Path(args[0]).read_text(), overrides))


if __name__ == "__main__":
    main()
