"""onnxruntime-extensions: the one library of custom operators the server will load into a
model's session (tokenizers, string and audio operators in the `ai.onnx.contrib` domain), so
that pre- and post-processing run inside the TEE with the model.

The operator turns it on with `--enable-ort-extensions` (the default when the package is
installed); the ONNX check then accepts exactly this domain and the worker registers exactly
this library, before it confines itself (after chroot there is no file to load it from).
"""

from __future__ import annotations

import importlib.util

DOMAIN = "ai.onnx.contrib"


def installed() -> bool:
    return importlib.util.find_spec("onnxruntime_extensions") is not None


def library_path() -> str:
    """The shared library to register with `SessionOptions.register_custom_ops_library`;
    raises ImportError when the package is missing."""
    import onnxruntime_extensions

    return str(onnxruntime_extensions.get_library_path())
