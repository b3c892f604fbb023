"""Logging setup: JSON lines (one object per record) or plain text.

Records logged while an RPC is handled carry its `request_id` (from the
`x-request-id` metadata, or generated) via the `REQUEST_ID` context variable, which
the transport interceptor sets. `ACCESS_LOG` gets one line per RPC.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("balpm_request_id", default="")
ACCESS_LOG = logging.getLogger("balpm.access")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:/+=\-]{1,128}$")


def request_id_from(value: str | bytes | None) -> str:
    """A safe request id: the caller's when well formed (1-128 of [A-Za-z0-9_.:/+=-]), else a new one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and _REQUEST_ID_RE.match(value):
        return value
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds the current RPC's `request_id` to records that do not carry one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            rid = REQUEST_ID.get()
            if rid:
                record.request_id = rid
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object, with `extra=` fields as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def setup_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Configure the root logger once.

    Args:
        level: Level name.
        json_lines: JSON lines when true, plain text otherwise.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
