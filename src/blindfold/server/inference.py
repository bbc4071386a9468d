"""Running a model the caller resolved: its inputs checked against the model, the outputs the
caller asked for chosen in the model's order, the run through the runner's scheduler, and a
signed receipt when the caller asks for one. It raises domain errors (`server.refusals`) and
knows nothing of HTTP or of the OIP wire format: routes parse and render around it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from blindfold.receipts import ReceiptSigner
from blindfold.server.model_record import ModelRecord
from blindfold.server.pools import Pool
from blindfold.server.refusals import InvalidRequest
from blindfold.server.runtime import InferenceRunner, Session
from blindfold.server.scheduler import RunTiming

# The receipt format signs the nonce as lowercase hex (receipts.Receipt).
RECEIPT_NONCE = re.compile(r"(?:[0-9a-f]{2})*")
MAX_RECEIPT_NONCE = 128


@dataclass(frozen=True)
class ReceiptRequest:
    """The caller asked for a signed receipt: `request_id` and `nonce` go into it."""

    request_id: str | None
    nonce: object = ""  # as the client sent it: checked by `InferenceService`


@dataclass(frozen=True)
class InferenceResult:
    outputs: dict[str, np.ndarray]  # the chosen outputs by name, in the model's order
    parameters: dict[str, Any]  # model_sha256 and, when asked for, the receipt


class InferenceService:
    def __init__(self, runner: InferenceRunner, receipts: ReceiptSigner, codec: Pool) -> None:
        self._runner = runner
        self._receipts = receipts
        self._codec = codec  # hashing the tensors for a receipt runs off the event loop

    async def infer(
        self,
        entry: ModelRecord,
        inputs: Mapping[str, np.ndarray],
        outputs: Collection[str] | None,
        timing: RunTiming,
        receipt: ReceiptRequest | None = None,
    ) -> InferenceResult:
        """Runs `entry`'s model on `inputs`; `outputs` None returns every output."""
        session = entry.loaded()
        session.check_inputs(inputs)
        names = select_outputs(session, outputs)
        nonce = None if receipt is None else receipt_nonce(receipt.nonce)
        feeds = dict(inputs)
        results = await self._runner.run(session, names, feeds, entry.scheduling, timing)
        chosen = dict(zip(names, results, strict=True))
        parameters: dict[str, Any] = {"model_sha256": entry.sha256}
        if receipt is not None and nonce is not None:
            # A receipt covers the model, the inputs and every output returned.
            signed = await self._codec.call(
                self._receipts.sign,
                entry.sha256,
                inputs,
                chosen,
                receipt.request_id or uuid.uuid4().hex,
                nonce,
            )
            parameters["receipt"] = signed.to_json()
        return InferenceResult(chosen, parameters)


def select_outputs(session: Session, requested: Collection[str] | None) -> list[str]:
    """The outputs to return, in the order the model declares them."""
    if requested is None:
        return session.output_names
    unknown = [name for name in requested if name not in session.output_names]
    if unknown:
        raise InvalidRequest(f"unknown outputs {unknown}; the model has {session.output_names}")
    return [name for name in session.output_names if name in requested]


def receipt_nonce(nonce: object) -> str:
    """The client's receipt nonce, refused unless the receipt format can sign it as it is."""
    if (
        not isinstance(nonce, str)
        or len(nonce) > MAX_RECEIPT_NONCE
        or not RECEIPT_NONCE.fullmatch(nonce)
    ):
        raise InvalidRequest(
            f"receipt_nonce must be lowercase hex of at most {MAX_RECEIPT_NONCE} characters, "
            "e.g. secrets.token_hex(16) or uuid.uuid4().hex",
        )
    return nonce
