"""Logging of ``iscsi-target serve``: text for people (the default) or
JSON lines for log collectors (``--log-format json``), to stderr or to a
file (``--log-file``). Standard library only.

Log calls that describe an event (a login, a refusal, a logout, a session
end) pass its parameters as ``extra=`` fields: the text format shows the
message alone (it says them in words), the JSON format adds them as keys,
so a log pipeline filters on ``event``, ``initiator`` or ``cause`` without
parsing sentences.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from datetime import datetime, timezone

#: LogRecord attributes that are not a caller's ``extra=`` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
#: The values ``--log-format`` and ``[server] log_format`` take.
LOG_FORMATS = ("text", "json")


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
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        # default=str: a field JSON has no type for (a path, an address)
        # is written as its text; dicts and lists stay structured.
        return json.dumps(doc, ensure_ascii=False, default=str)


class LogSetupError(Exception):
    """The log destination cannot be used (one line for the user)."""


def _under_journal() -> bool:
    """True when stderr goes to the systemd journal, which stamps each line
    itself (systemd sets JOURNAL_STREAM to its device:inode, systemd.exec(5))."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def setup_logging(verbose: int, *, fmt: str = "text", path: str | None = None,
                  what: str = "--log-file") -> None:
    """Configure the root logger: INFO (DEBUG with -vv), ``fmt`` "text" or
    "json", to ``path`` (appended) or stderr. ``what`` names the setting
    that gave ``path`` in the one-line error when it cannot be opened."""
    handler: logging.Handler
    if path:
        try:
            # Watched: when logrotate moves the file away, the next line
            # goes to a new file at ``path`` (no signal needed).
            handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise LogSetupError(f"{what} {path}: {exc.strerror}; give a writable file") \
                from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif not path and _under_journal():
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
