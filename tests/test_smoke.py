"""The shortest path through the product: attest, upload, run, delete."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

import blindfold

from onnx_models import identity_model


def test_upload_run_delete(client: blindfold.Client) -> None:
    uploaded = client.upload_model(identity_model(TensorProto.FLOAT), name="smoke")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    outputs = client.run_model("smoke", x)
    np.testing.assert_array_equal(outputs["y"], x)
    client.delete_model("smoke", token=uploaded.owner_token)
    with pytest.raises(blindfold.NotFoundError):
        client.run_model("smoke", x)
