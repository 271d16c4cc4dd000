"""structlog set-up: JSON lines for machines, a readable console for people.

Follows structlog's production advice: one configuration at start-up, a level filter
that makes filtered-out calls no-ops, and stdlib ``logging`` records (trio's, or any
library's) rendered by the same renderer through ``ProcessorFormatter``. A session's
context (its id, client, upstream) is bound to its logger (``shell/connection.py``);
contextvars carry what a whole process shares, a worker's index, merged into every line.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def default_format(stream: TextIO) -> str:
    return "console" if stream.isatty() else "json"


def configure(log_format: str, level: str, stream: TextIO | None = None) -> None:
    """``log_format``: json, console, or auto (console on a terminal); ``level``: debug to error."""
    stream = stream or sys.stdout
    if log_format == "auto":
        log_format = default_format(stream)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # One write per line, newline included (print() writes the newline apart), so
        # worker processes sharing stdout never splice their lines together.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)
