"""Structured logs: one JSON object per line, carrying ids, never patient data.

Callers pass ids in ``extra`` (association_id, delivery_id, reason, status); values read
from data sets (names, IDs, dates, UIDs) are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # the type and where it was raised; never the message, which may hold values
            out["error"] = record.exc_info[0].__name__
            tb = traceback.extract_tb(record.exc_info[2])
            out["at"] = " < ".join(
                f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(tb[-6:])
            )
        return json.dumps(out, ensure_ascii=True)


# a quoted value in a library's message: pydicom and pynetdicom quote the values they complain of
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_LIBRARIES = ("pydicom", "pynetdicom", "py.warnings")


class RedactLibraryValues(logging.Filter):
    """Replaces quoted values in records of pydicom, pynetdicom and Python warnings (where
    :func:`configure` sends ``warnings.warn``) with ``'<value>'``: the libraries' own messages
    quote a data set's values, the node's never do."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if any(name == lib or name.startswith(lib + ".") for lib in _LIBRARIES):
            record.msg = _QUOTED.sub("'<value>'", record.getMessage())
            record.args = None
        return True


def configure(level: str = "INFO") -> None:
    # pydicom's import sets its logger's level; the gateway package imported it already
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactLibraryValues())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # warnings.warn (pydicom warns as well as logs) would print to stderr past the formatter
    logging.captureWarnings(True)
    # so would an uncaught exception, message and all (a library's may quote a value): it is
    # logged as any other, by its type and where it was raised
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("gateway.uncaught").error("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as threading's own hook: a thread's sys.exit() is no error
    thread = args.thread.name if args.thread is not None else ""
    logging.getLogger("gateway.uncaught").error(
        "uncaught exception in a thread",
        exc_info=(
            (args.exc_type, args.exc_value, args.exc_traceback)
            if args.exc_value is not None
            else False
        ),
        extra={"thread_name": thread},
    )
