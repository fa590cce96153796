"""Worker log format: Faust's text lines (default) or one JSON object per line (``STREAM_APP_LOG_FORMAT=json``)
for log shippers (Loki, Elasticsearch, Cloud Logging), which then need no parsing rules."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO-8601 ms), level, logger, message, exception if any.

    >>> r = logging.LogRecord("stream_app", logging.WARNING, "f.py", 1, "dead-lettered %s", ("clicks@5",), None)
    >>> r.created = 0.0
    >>> JsonFormatter().format(r)
    '{"time":"1970-01-01T00:00:00.000Z","level":"WARNING","logger":"stream_app","message":"dead-lettered clicks@5"}'
    """

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def logging_config(log_format: str, level: str) -> dict | None:
    """The dictConfig Faust's worker applies (None: Faust's own text format)."""
    if log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["default"]},
    }
