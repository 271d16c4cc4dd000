"""Prometheus metrics, fed by the log lines pipeproxy already writes.

The protocol core says what happened in ``Log`` actions (``core/logschema.py``); the
shell hands each one to ``observe`` as it writes it, and the server reports what
happens at the door. So the figures and the logs cannot disagree, and the core knows
nothing of metrics.

With ``--workers`` each worker writes its figures to files in a directory shared with
the parent (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and
the parent, which serves ``/metrics`` and the health endpoint, adds them up: the
figures cover every worker, including the ones that died and were replaced (their
counters stay; their open sessions go). prometheus_client picks its storage when it is
first imported, so the parent sets the variable before it starts a worker, and a
spawned worker imports it afresh.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from ..core import logschema as L
from ..core.actions import Log

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a loopback MTA (milliseconds) to the RFC 5321 data_end timeout (600 s).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
SESSION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600)

# Outcomes kept as they are; any other (a client that left, a timeout, a reason with an
# error's text in it) is counted as "not completed", so the label's values stay few.
OUTCOMES = frozenset({"message accepted", "message refused", "MAIL refused", "DATA refused"})

SESSIONS_OPEN = "pipeproxy_sessions_open"
UPSTREAM_ALIVE = "pipeproxy_upstream_last_greeting_timestamp_seconds"


class Metrics:
    """The figures of one process. ``registry`` None: not registered (a worker, whose
    figures the parent collects from the shared directory)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.sessions_open = Gauge(SESSIONS_OPEN, "client sessions open now", registry=r,
                                   multiprocess_mode="livesum")
        self.sessions = Counter("pipeproxy_sessions", "client sessions accepted", registry=r)
        self.refusals = Counter("pipeproxy_refusals", "clients and commands refused by pipeproxy itself",
                                ["reason"], registry=r)
        self.messages = Counter("pipeproxy_messages", "mail transactions ended, by outcome", ["outcome"], registry=r)
        self.recipients = Counter("pipeproxy_recipients", "RCPT commands answered, by result", ["result"],
                                  registry=r)
        self.upstream_replies = Counter(
            "pipeproxy_upstream_replies", "upstream replies: its greeting and its final reply to each message, "
            "by code", ["stage", "code"], registry=r)
        self.upstream_wait = Histogram("pipeproxy_upstream_wait_seconds", "time one transaction waited on the "
                                       "upstream", buckets=WAIT_BUCKETS, registry=r)
        self.session_duration = Histogram("pipeproxy_session_duration_seconds", "how long client sessions lasted",
                                          buckets=SESSION_BUCKETS, registry=r)
        self.upstream_alive = Gauge(UPSTREAM_ALIVE, "when the upstream last greeted pipeproxy (Unix time)",
                                    registry=r, multiprocess_mode="max")
        # What every transaction line counts into, looked up once: labels() takes a lock
        # and builds a tuple each call. A child stays its label values' for good.
        self._accepted = self.recipients.labels("accepted")
        self._refused = self.recipients.labels("refused")
        self._outcomes: dict[str, Counter] = {}  # messages, by outcome label (few), as they come
        self._final_codes: dict[object, Counter] = {}  # upstream_replies{stage="message"}, by code

    def observe(self, event: str, fields: dict[str, Any]) -> None:
        """One log line's worth of figures."""
        if event == L.TRANSACTION.name:
            outcome = str(fields.get("outcome"))
            if not (outcome in OUTCOMES or outcome.startswith("refused: ")):
                outcome = "not completed"
            if (counter := self._outcomes.get(outcome)) is None:
                counter = self._outcomes[outcome] = self.messages.labels(outcome)
            counter.inc()
            if accepted := fields.get("recipients_accepted"):
                self._accepted.inc(accepted)
            if refused := fields.get("recipients_rejected"):
                self._refused.inc(refused)
            self.upstream_wait.observe(fields.get("upstream_wait") or 0)
            if (code := fields.get("reply_code")) is not None:
                if (counter := self._final_codes.get(code)) is None:
                    counter = self._final_codes[code] = self.upstream_replies.labels("message", str(code))
                counter.inc()
        elif event == L.SESSION_CLOSED.name:
            self.session_duration.observe(fields.get("duration") or 0)
        elif event == L.UPSTREAM_GREETING.name:
            code = fields.get("code")
            self.upstream_replies.labels("greeting", str(code)).inc()
            if code == 220:
                self.upstream_alive.set(time.time())
        elif event in (L.COMMAND_REFUSED.name, L.CLIENT_REFUSED.name):
            self.refusals.labels(str(fields.get("reason"))).inc()
        elif event == L.TOO_MANY_SESSIONS.name:
            self.refusals.labels("too many sessions").inc()
        elif event == L.BAD_PROXY_HEADER.name:
            self.refusals.labels("bad PROXY header").inc()

    def session_opened(self) -> None:
        self.sessions.inc()
        self.sessions_open.inc()

    def session_ended(self) -> None:
        self.sessions_open.dec()


class BuildInfo:
    """``pipeproxy_build_info{version=...} 1``, served by whichever process answers /metrics."""

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("pipeproxy_build_info", "the pipeproxy version running", labels=["version"])
        info.add_metric([version("pipeproxy")], 1)
        yield info


class Exposition:
    """What /metrics and the health endpoint read: this process's figures, or, with
    workers, every worker's from ``directory``."""

    def __init__(self, directory: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(BuildInfo())
        if directory is not None:
            MultiProcessCollector(self.registry, directory)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, combine: Callable[[Iterable[float]], float] = sum) -> float:
        """One metric's samples (all workers'), combined; 0 if there are none."""
        values = [sample.value for metric in self.registry.collect() for sample in metric.samples
                  if sample.name == name]
        return combine(values) if values else 0.0


# The process's Metrics, set once at start-up by the runner (None: not counting).
current: Metrics | None = None


def observe(action: Log) -> None:
    """The hook the shell calls for every Log action it writes."""
    if current is not None:
        current.observe(action.event, action.fields)


def observe_line(event: L.LogEvent, **fields: Any) -> None:
    """The same for a line the shell writes itself (the door's refusals)."""
    if current is not None:
        current.observe(event.name, fields)


def start(directory: str | None = None) -> Exposition | None:
    """Set up this process's figures: ``directory`` None: single process, counted here and
    exposed here (the Exposition returned); otherwise a worker writing to the shared files
    (None returned: the parent exposes them)."""
    global current
    if directory is None:
        exposition = Exposition()
        current = Metrics(exposition.registry)
        return exposition
    assert os.environ.get(MULTIPROC_VARIABLE) == directory, "set before prometheus_client was imported"
    current = Metrics(None)
    return None
