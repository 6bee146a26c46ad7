"""Logging of ``iscsi-target serve``: text for people (the default) or
JSON lines for log collectors (``--log-format json``), to stderr or to a
file (``--log-file``). Standard library only."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

#: LogRecord attributes that are not a caller's ``extra=`` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger,
    message, any ``extra=`` fields, and the exception text if any."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                    else str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class LogSetupError(Exception):
    """The log destination cannot be used (one line for the user)."""


def setup_logging(verbose: int, *, fmt: str = "text", path: str | None = None) -> None:
    """Configure the root logger: INFO (DEBUG with -vv), ``fmt`` "text" or
    "json", to ``path`` (appended) or stderr."""
    handler: logging.Handler
    if path:
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise LogSetupError(f"--log-file {path}: {exc.strerror}; give a writable file") \
                from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
