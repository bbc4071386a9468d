"""onnxruntime-extensions: the one library of custom operators the server will load into a
model's session (tokenizers, string and audio operators in the `ai.onnx.contrib` domain), so
that pre- and post-processing run inside the TEE with the model.

The operator turns it on with `--enable-ort-extensions` (the default when the package is
installed); the ONNX check then accepts exactly this domain and the worker registers exactly
this library, before it confines itself (after chroot there is no file to load it from).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

DOMAIN = "ai.onnx.contrib"
_LIBRARY = "_extensions_pydll"  # the package's compiled module: the operators' library


def installed() -> bool:
    return importlib.util.find_spec("onnxruntime_extensions") is not None


def library_path() -> str:
    """The shared library to register with `SessionOptions.register_custom_ops_library`;
    raises ImportError when the package is missing.

    Found on disk rather than through `onnxruntime_extensions.get_library_path()`: importing
    the package imports PyTorch when it is installed (for its converters), which would load
    libtorch into the process that holds the server's keys."""
    spec = importlib.util.find_spec("onnxruntime_extensions")
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(folder) / f"{_LIBRARY}{suffix}"
            if candidate.is_file():
                return str(candidate)
    raise ImportError(
        "onnxruntime-extensions is not installed, or its operator library "
        f"({_LIBRARY}) is missing: pip install onnxruntime-extensions"
    )
