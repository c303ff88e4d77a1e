"""Log lines on stderr, one per event. text: journald adds the time and the unit, and the level
leads when it matters ("warning: ..."); json: one object per line, for log shippers."""

from __future__ import annotations

import json
import logging
import sys


def setup(level: int = logging.INFO, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(levelname_)s%(message)s"))
        handler.addFilter(_level_prefix)
    logger = logging.getLogger("nftlb")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def _level_prefix(record: logging.LogRecord) -> bool:
    record.levelname_ = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
    return True


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)
