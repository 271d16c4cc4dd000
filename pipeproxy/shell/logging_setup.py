"""structlog set-up: JSON lines for machines, a readable console for people.

Follows structlog's production and performance advice: one configuration at start-up, a
level filter that makes filtered-out calls no-ops, JSON rendered by orjson and written
as bytes, and stdlib ``logging`` records (trio's, or any library's) rendered by the same
renderer through ``ProcessorFormatter``. A session's context (its id, client, upstream)
is bound to its logger (``shell/connection.py``); what a whole process shares, a worker's
index, is added to every line by a processor of its own.

A loaded process writes a ``transaction`` line a message, so the processors are the
cheap ones: the timestamp's date and time are formatted once a second (structlog's
``TimeStamper`` formats a datetime each line), and the worker's index is a constant
(``merge_contextvars`` would copy the task's context each line to find it).
"""

from __future__ import annotations

import codecs
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

import orjson
import structlog


def default_format(stream: TextIO) -> str:
    return "console" if stream.isatty() else "json"


def json_bytes(event_dict: Any, **kwargs: Any) -> bytes:
    """A line's JSON by orjson; where orjson refuses (a lone surrogate, which a client's
    bytes that are not UTF-8 become; a key that is not a str; an int beyond 64 bits), by
    the json module, as before orjson."""
    try:
        return orjson.dumps(event_dict, **kwargs)
    except orjson.JSONEncodeError:
        return json.dumps(event_dict, **kwargs).encode()


def json_text(event_dict: Any, **kwargs: Any) -> str:
    """The same, as text (stdlib records: ``logging.Formatter`` returns str)."""
    return json_bytes(event_dict, **kwargs).decode()


def binary(stream: TextIO) -> BinaryIO | None:
    """The byte stream under ``stream``, if it has one and bytes written there read as
    its text would (UTF-8, as orjson writes); None otherwise (a StringIO, say)."""
    buffer = getattr(stream, "buffer", None)
    try:
        utf8 = codecs.lookup(getattr(stream, "encoding", None) or "").name == "utf-8"
    except LookupError:
        utf8 = False
    return buffer if utf8 else None


class Timestamp:
    """structlog processor: ``timestamp``, ISO 8601 in UTC to the microsecond, always six
    digits of them ("2026-11-29T10:10:29.745378Z", "2026-11-30T00:00:00.000000Z": a fixed
    width, where ``TimeStamper(fmt="iso", utc=True)`` leaves the fraction out at a whole
    second), the clock's nanoseconds floored, as structlog does."""

    def __init__(self) -> None:
        # (second, its text), one value: a thread that logs meanwhile sees the pair whole.
        self._cached: tuple[int, str] | None = None

    def __call__(self, logger: Any, method: str, event_dict: Any) -> Any:
        second, nanoseconds = divmod(time.time_ns(), 1_000_000_000)  # floors, before 1970 too
        cached = self._cached
        if cached is None or cached[0] != second:
            cached = self._cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        event_dict["timestamp"] = f"{cached[1]}.{nanoseconds // 1000:06d}Z"
        return event_dict


def add_worker(index: int) -> structlog.types.Processor:
    """structlog processor: the worker's index, in every line of a worker process."""

    def processor(logger: Any, method: str, event_dict: Any) -> Any:
        event_dict.setdefault("worker", index)
        return event_dict

    return processor


def configure(log_format: str, level: str, stream: TextIO | None = None, worker: int | None = None) -> None:
    """``log_format``: json, console, or auto (console on a terminal); ``level``: debug to
    error; ``worker``: the index of the worker process this is.

    Call it before the first line: a ``get_logger()`` logger is cached when first used
    and keeps the stream and level of the configuration then in force."""
    stream = stream or sys.stdout
    if log_format == "auto":
        log_format = default_format(stream)
    shared: list[structlog.types.Processor] = [
        *([] if worker is None else [add_worker(worker)]),
        structlog.processors.add_log_level,
        Timestamp(),
    ]
    renderer: structlog.types.Processor
    foreign: structlog.types.Processor  # for stdlib records, which must come out as str
    # Every logger writes each line whole, newline included, and flushes it (one write(2)
    # a line), so worker processes sharing stdout never splice their lines together.
    # Text written to the same stream must be flushed before a line is (the demo's is).
    factory: Callable[..., Any] = structlog.WriteLoggerFactory(stream)
    foreign = renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    if log_format == "json":
        shared.append(structlog.processors.format_exc_info)
        if (buffer := binary(stream)) is not None:
            renderer = structlog.processors.JSONRenderer(serializer=json_bytes)
            foreign = structlog.processors.JSONRenderer(serializer=json_text)
            factory = structlog.BytesLoggerFactory(buffer)
        else:
            foreign = renderer = structlog.processors.JSONRenderer()
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, foreign],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)
