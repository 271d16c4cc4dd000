"""What ``pipeproxy inspect`` prints: a table, JSON, a session's timeline, a summary.

Each output is fed by the Grouper (reading.py): ``transaction(line, session)`` for each
transaction the filter picked, ``session(session)`` as each session ends, ``finish()``
at the end of the input. Text goes through ``Writer``: plain, or coloured by rich when
asked (on a terminal, by default), so that colour never costs a pipe anything.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, TextIO

from .reading import Line, Session

Segment = tuple[str, str | None]  # text, rich style

# The fields a session's lines all carry (structlog context) and the ones every line has.
CONTEXT = {"session", "client", "upstream", "worker", "event", "level", "timestamp", "logger"}


class Writer:
    """Lines made of segments, written plain or in colour (rich, imported only then)."""

    def __init__(self, stream: TextIO, color: bool, flush: bool = False) -> None:
        self.stream = stream
        self.flush = flush
        self.console: Any = None
        if color:
            from rich.console import Console

            # Asked for colour, so colour even into a pipe (--color always); rich still honours NO_COLOR.
            self.console = Console(file=stream, force_terminal=True, highlight=False, soft_wrap=True, emoji=False,
                                   markup=False)

    def line(self, *segments: Segment) -> None:
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text.assemble(*((text, style or "") for text, style in segments)))
        else:
            self.stream.write("".join(text for text, _ in segments) + "\n")
        if self.flush:
            self.stream.flush()

    def text(self, text: str) -> None:
        self.line((text, None))


def short_time(timestamp: str) -> str:
    """"2026-11-29T04:53:08.662479Z" as "2026-11-29 04:53:08"."""
    return f"{timestamp[:10]} {timestamp[11:19]}" if len(timestamp) >= 19 and timestamp[10] == "T" else timestamp


def clock(timestamp: str) -> str:
    """The time of day to the millisecond: "04:53:08.662"."""
    return timestamp[11:23] if len(timestamp) >= 23 and timestamp[10] == "T" else timestamp


def millis(seconds: Any) -> str:
    return f"{seconds * 1000:.1f} ms" if isinstance(seconds, int | float) else "-"


def reply_style(code: Any) -> str:
    if not isinstance(code, int):
        return "red"
    return "green" if code < 400 else "yellow" if code < 500 else "red"


def final_reply(line: Line) -> str:
    code, text = line.get("reply_code"), line.get("reply")
    if code is None:
        return "-"
    return f"{code} {text}" if text else str(code)


def fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


def recipients(line: Line) -> list[dict[str, Any]] | None:
    """The transaction's recipients as {address, code, reply}; None if the log does not name them."""
    logged = line.get("recipients")
    if not isinstance(logged, list):
        return None
    return [
        {"address": r.get("address"), "code": r.get("code"), "reply": r.get("reply")}
        for r in logged
        if isinstance(r, dict)
    ]


class Table:
    """One line per transaction: time, session, client, sender, recipients, wait, outcome, reply."""

    HEADER = (("time", 19), ("session", 12), ("client", 21), ("sender", 28), ("rcpt ok/no", 10),
              ("upstream", 9), ("outcome", 22))

    def __init__(self, writer: Writer, header: bool = True) -> None:
        self.writer = writer
        if header:
            heading = " ".join(fit(name, width) for name, width in self.HEADER) + " final reply"
            writer.line((heading, "bold"))

    def transaction(self, line: Line, session: Session) -> None:
        widths = dict(self.HEADER)
        accepted, refused = line.get("recipients_accepted"), line.get("recipients_rejected")
        sender = line.get("sender")
        style = reply_style(line.get("reply_code"))
        self.writer.line(
            (fit(short_time(line["timestamp"]), widths["time"]) + " ", "dim"),
            (fit(str(line.get("session", "")), widths["session"]) + " ", "cyan"),
            (fit(str(line.get("client", "")), widths["client"]) + " ", None),
            (fit("<>" if sender == "" else str(sender), widths["sender"]) + " ", None),
            (fit(f"{accepted}/{refused}", widths["rcpt ok/no"]) + " ", "red" if refused else None),
            (millis(line.get("upstream_wait")).rjust(widths["upstream"]) + " ", "dim"),
            (fit(str(line.get("outcome", "")), widths["outcome"]) + " ", style),
            (final_reply(line), style),
        )

    def session(self, session: Session) -> None:
        pass

    def finish(self) -> None:
        pass


class Json:
    """One JSON object per transaction the filter picked."""

    def __init__(self, stream: TextIO, flush: bool = False) -> None:
        self.stream = stream
        self.flush = flush

    def transaction(self, line: Line, session: Session) -> None:
        record = {
            "time": line["timestamp"],
            "session": line.get("session"),
            "client": line.get("client"),
            "server": session.server,
            "upstream": line.get("upstream"),
            "helo": line.get("helo"),
            "sender": line.get("sender"),
            "recipients": recipients(line),
            "recipients_accepted": line.get("recipients_accepted"),
            "recipients_rejected": line.get("recipients_rejected"),
            "size": line.get("size"),
            "message_id": line.get("message_id"),
            "queue_id": line.get("queue_id"),
            "reply_code": line.get("reply_code"),
            "reply": line.get("reply"),
            "outcome": line.get("outcome"),
            "upstream_wait": line.get("upstream_wait"),
            "groups": line.get("groups"),
        }
        for optional in ("tls", "worker"):
            if line.get(optional) is not None:
                record[optional] = line[optional]
        self.stream.write(json.dumps(record) + "\n")
        if self.flush:
            self.stream.flush()

    def session(self, session: Session) -> None:
        pass

    def finish(self) -> None:
        pass


DIRECTIONS = {"client": "client ", "to upstream": "→ MTA  ", "upstream": "MTA    ", "to client": "→ client"}


class Timeline:
    """The sessions asked for (``keep``), each as a readable story, as each one ends."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.shown = 0

    def transaction(self, line: Line, session: Session) -> None:
        pass

    def finish(self) -> None:
        pass

    def session(self, session: Session) -> None:
        if session.lines is None:
            return
        write = self.writer.line
        if self.shown:
            write(("", None))
        self.shown += 1
        worker = session.first.get("worker")
        write(
            (f"session {session.id}", "bold cyan"),
            (f"  client {session.client or '?'}", None),
            (f"  EHLO name {session.helo}" if session.helo else "  no EHLO name logged", None),
            (f"  (worker {worker})" if worker is not None else "", "dim"),
        )
        for line in session.lines:
            self.event(line)
        if session.closed is None:
            write((" " * 14 + "still open at the end of the log", "yellow"))

    def event(self, line: Line) -> None:
        write = self.writer.line
        at = (clock(line["timestamp"]) + "  ", "dim")
        event = line["event"]
        if event == "session open":
            where = f" on {line['server']}" if line.get("server") else ""
            write(at, (f"opened: client {line.get('client')}{where}, upstream {line.get('upstream')}", None))
        elif event == "transcript":
            direction = DIRECTIONS.get(str(line.get("direction")), str(line.get("direction")))
            said = line.get("line") if "line" in line else f"{line.get('code')} {line.get('text', '')}"
            code = line.get("code")
            write(at, (f"  {direction} ", "dim"), (str(said), reply_style(code) if code is not None else None))
        elif event == "transaction":
            self.transaction_story(line, at)
        elif event == "session closed":
            clean = line.get("level") == "info"
            write(
                at,
                (f"closed: {line.get('reason')}", "green" if clean else "red"),
                (f" after {line.get('duration')} s, {line.get('commands')} commands, "
                 f"{line.get('messages')} messages", None),
            )
        else:
            fields = ", ".join(f"{key} {value}" for key, value in line.items() if key not in CONTEXT)
            level = line.get("level")
            style = "red" if level in ("error", "critical") else "yellow" if level == "warning" else None
            write(at, (event + (f": {fields}" if fields else ""), style))

    def transaction_story(self, line: Line, at: Segment) -> None:
        write = self.writer.line
        indent = " " * 16
        sender = line.get("sender")
        details = [f"size {line['size']}"] if line.get("size") is not None else []
        if line.get("message_id"):
            details.append(f"Message-ID {line['message_id']}")
        shown = f"  ({', '.join(details)})" if details else ""
        write(at, (f"transaction: MAIL FROM:<{sender}>", "bold"), (shown, None))
        listed = recipients(line)
        if listed is None:
            write((indent + f"recipients: {line.get('recipients_accepted')} accepted, "
                   f"{line.get('recipients_rejected')} refused (this log does not name them)", None))
        for recipient in listed or ():
            code = recipient["code"]
            answer = f"{code} {recipient['reply']}" if recipient.get("reply") else str(code)
            write((indent + f"RCPT TO:<{recipient['address']}>  ", None), (answer, reply_style(code)))
        style = reply_style(line.get("reply_code"))
        queue = f" (queue id {line['queue_id']})" if line.get("queue_id") else ""
        write((indent, None), (f"{line.get('outcome')}: {final_reply(line)}{queue}", style))
        write((indent + f"waited {millis(line.get('upstream_wait'))} on the upstream; "
               f"replies per client write {line.get('groups')}", "dim"))


class Quantiles:
    """p50 and p99 in bounded memory: a histogram of buckets 1 % wide."""

    STEP = math.log(1.01)

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0

    def add(self, value: float) -> None:
        self.count += 1
        self.buckets[-(10**9) if value <= 0 else math.floor(math.log(value) / self.STEP)] += 1

    def quantile(self, q: float) -> float:
        """The nearest-rank q-quantile, to 1 %: the bucket's upper bound."""
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return 0.0 if bucket == -(10**9) else math.exp((bucket + 1) * self.STEP)
        return 0.0


ADDRESS = re.compile(r"<[^<>]*>")
MAX_KEYS = 1000  # distinct reasons kept; the rest are counted as "(others)"


def count(counter: Counter[str], key: str) -> None:
    if key in counter or len(counter) < MAX_KEYS:
        counter[key] += 1
    else:
        counter["(others)"] += 1


class Summary:
    """Counts over the whole input, in memory bounded by the number of distinct reasons."""

    def __init__(self, writer: Writer, filtered: bool) -> None:
        self.writer = writer
        self.filtered = filtered
        self.sessions = 0
        self.sessions_matched = 0
        self.still_open = 0
        self.close_reasons: Counter[str] = Counter()
        self.transactions = 0
        self.outcomes: Counter[str] = Counter()
        self.final_codes: Counter[str] = Counter()
        self.recipient_codes: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.unnamed_refusals = 0
        self.waits = Quantiles()
        self.replies = 0
        self.writes = 0
        self.events: dict[str, int] = {}

    def transaction(self, line: Line, session: Session) -> None:
        session.matched += 1
        self.transactions += 1
        count(self.outcomes, str(line.get("outcome")))
        count(self.final_codes, str(line.get("reply_code") if line.get("reply_code") is not None else "none"))
        listed = recipients(line)
        if listed is None:
            refused = line.get("recipients_rejected")
            self.unnamed_refusals += refused if isinstance(refused, int) else 0
        for recipient in listed or ():
            count(self.recipient_codes, str(recipient["code"]))
            if isinstance(recipient["code"], int) and recipient["code"] >= 400:
                count(self.refusals, ADDRESS.sub("<…>", f"{recipient['code']} {recipient['reply'] or ''}".strip()))
        wait = line.get("upstream_wait")
        if isinstance(wait, int | float):
            self.waits.add(wait)
        groups = line.get("groups")
        if isinstance(groups, list) and all(isinstance(g, int) for g in groups):
            self.replies += sum(groups)
            self.writes += len(groups)

    def session(self, session: Session) -> None:
        self.sessions += 1
        self.sessions_matched += session.matched > 0
        if session.closed is None:
            self.still_open += 1
        else:
            count(self.close_reasons, str(session.closed.get("reason")))

    def finish(self) -> None:
        write = self.writer.text
        matched = f", {self.sessions_matched} with a transaction the filter picked" if self.filtered else ""
        open_now = f", {self.still_open} still open at the end" if self.still_open else ""
        write(f"sessions: {self.sessions}{matched}{open_now}")
        self.listing("  closed because", self.close_reasons)
        write(f"transactions{' picked' if self.filtered else ''}: {self.transactions}")
        self.listing("  by outcome", self.outcomes)
        write("final reply codes: " + (", ".join(f"{c} ×{n}" for c, n in self.final_codes.most_common()) or "-"))
        write("recipient replies: " + (", ".join(f"{c} ×{n}" for c, n in self.recipient_codes.most_common()) or "-"))
        self.listing("refused recipients by reason", self.refusals)
        if self.unnamed_refusals:
            write(f"  {self.unnamed_refusals} refused recipient(s) in lines that do not name them")
        if self.waits.count:
            p50, p99 = self.waits.quantile(0.5), self.waits.quantile(0.99)
            write(f"upstream wait per transaction: p50 {millis(p50)}, p99 {millis(p99)} "
                  f"(of {self.waits.count}; to within 1 %)")
        write(f"client round trips saved: {self.replies - self.writes} "
              f"({self.replies} replies in transactions, in {self.writes} client writes)")
        if self.events:
            write("other lines: " + ", ".join(f"{event} ×{n}" for event, n in sorted(self.events.items())))

    def listing(self, title: str, counter: Counter[str]) -> None:
        if not counter:
            return
        self.writer.text(f"{title}:")
        width = max(len(str(n)) for n in counter.values())
        for key, n in counter.most_common():
            self.writer.text(f"    {str(n).rjust(width)}  {key}")
