"""The SDK's face: every public error and type is importable from `blindfold`, the simulation
warning has its own class, and the Client's public methods say what they do."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import blindfold
from blindfold import errors

TESTS = Path(__file__).resolve().parent


def test_every_public_error_is_exported() -> None:
    public = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value)
        and issubclass(value, (errors.BlindfoldError, Warning))
        and value.__module__ == errors.__name__
    }
    # RequestRejected is the server's way to answer an HTTP error; the SDK never raises it.
    public.discard("RequestRejected")
    assert public <= set(blindfold.__all__), public - set(blindfold.__all__)
    for name in blindfold.__all__:
        assert getattr(blindfold, name) is not None


def test_types_callers_name_are_exported() -> None:
    for name in ("AttestedServer", "Verdict", "Evidence", "Policy", "VerifierOptions"):
        assert name in blindfold.__all__
    assert issubclass(blindfold.SimulationWarning, UserWarning)
    assert issubclass(blindfold.TeeKindNotAllowed, blindfold.PolicyError)


def test_client_public_methods_have_docstrings() -> None:
    assert blindfold.Client.__doc__
    undocumented = [
        name
        for name, member in inspect.getmembers(blindfold.Client, inspect.isfunction)
        if not name.startswith("_") and not member.__doc__
    ]
    assert undocumented == []
    assert blindfold.connect.__doc__


def test_one_meaning_per_name() -> None:
    from blindfold.attestation import binding
    from blindfold.receipts import public_key_sha256_hex

    # `public_key_sha256` is the digest (bytes) everywhere; the hex form has its own name.
    assert inspect.signature(binding.public_key_sha256).return_annotation in (bytes, "bytes")
    assert inspect.signature(public_key_sha256_hex).return_annotation in (str, "str")
    import blindfold.receipts as receipts

    assert not hasattr(receipts, "public_key_sha256") or (
        receipts.public_key_sha256 is binding.public_key_sha256
    )


def test_missing_vectors_fail_unless_explicitly_allowed(tmp_path: Path) -> None:
    # CI once passed while skipping most verifier tests because ../shared was absent.
    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(TESTS / "attestation" / "test_formats.py")],
            capture_output=True,
            text=True,
            cwd=TESTS.parent,
            env={**os.environ, "BLINDFOLD_VECTORS_DIR": str(tmp_path / "absent"), **env},
            check=False,
        )  # fmt: skip

    failed = run()
    assert failed.returncode != 0
    assert "attestation vectors not found" in failed.stdout
    assert "BLINDFOLD_ALLOW_MISSING_VECTORS=1" in failed.stdout
    skipped = run(BLINDFOLD_ALLOW_MISSING_VECTORS="1")
    assert skipped.returncode == 0, skipped.stdout
    assert "skipped" in skipped.stdout and "passed" in skipped.stdout  # the rest still runs
