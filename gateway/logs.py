"""One logging configuration for every entry point: text or JSON lines, with the request id.

`configure_logging(fmt)` is called by the command line and by each server process; the
request-id middleware (gateway/api/request_id.py) sets `REQUEST_ID` while a request is
served, and every line logged meanwhile carries it (`request_id` in JSON, `[id]` in text).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

REQUEST_ID: ContextVar[str | None] = ContextVar("credit_request_id", default=None)

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(request_tag)s%(message)s"


class _RequestIdFilter(logging.Filter):
    """Puts the request being served (if any) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request_id = rid
        record.request_tag = f"[{rid}] " if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id (when serving one)
    and the exception's traceback (when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            line["request_id"] = rid
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(
    fmt: LogFormat = "text", level: int | str = logging.INFO, stream: TextIO | None = None
) -> None:
    """Sends every logger's lines (uvicorn's too) to one stderr handler in `fmt`; called
    again, it replaces the handler it installed before."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    handler.set_name("credit-gateway")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "credit-gateway"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
