"""The server's logging: request ids, the model a request concerns, and the two log formats
(`blindfold serve --log-format text|json`).

A request's id and model live in context variables set by the HTTP layer, so every record
logged while it is handled carries them without each call passing them. Records never carry
payloads, tokens or tensor values: only what the messages themselves say (which the rest
of the server keeps free of them) and these few fields.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import uuid
from typing import Any

REQUEST_ID_HEADER = "X-Request-Id"
# What an incoming id may be (a proxy's UUID, a trace id...): anything else is replaced, so
# that an id can neither smuggle text into the logs nor grow them.
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "blindfold_request_id", default=None
)
# (name, sha256) of the model the current request concerns, once it is resolved.
request_model: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "blindfold_request_model", default=None
)


def choose_request_id(incoming: str | None) -> str:
    """The client's (or proxy's) `X-Request-Id` when it is sane, else a new one."""
    if incoming is not None and _SANE_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class _RequestContext(logging.Filter):
    """Adds the current request's id and model to every record (text format shows the id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        if not hasattr(record, "model"):
            current = request_model.get()
            record.model, record.model_sha256 = current if current else (None, None)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, and the request id and
    model when there are any. Exceptions are reduced to their type: a traceback's text can
    quote the data being processed."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in ("request_id", "model", "model_sha256"):
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
        return json.dumps(line, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{text} [request {rid}]" if rid else text


LOG_FORMATS = ("text", "json")


def configure(log_format: str) -> None:
    """Sends every logger of the process (the server's, uvicorn's, Python warnings) to
    stderr in the chosen format."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestContext())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's own logging setup: None (leave it to `configure`) for JSON, else uvicorn's
    default text handlers."""
    if log_format == "json":
        return {
            "version": 1,
            "disable_existing_loggers": False,
            "loggers": {
                name: {"handlers": [], "propagate": True, "level": "INFO"}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
            },
        }
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
