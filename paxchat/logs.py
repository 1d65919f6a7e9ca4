"""How a node writes its log: one line per event, as text or as JSON.

Under systemd the node's stdout goes to journald, which stamps each line
with the time and splits on newlines; a traceback over thirty lines would
become thirty entries. So every event is exactly one line here: newlines
and other control characters inside a message or traceback are escaped
(which also keeps a client-chosen string from forging a log line).

- ``text``: ``2026-11-22T05:04:18.123Z info [paxchat.node] message``; when
  stdout is the journal (``$JOURNAL_STREAM``), the time is left to journald
  and the line starts with ``<N>``, the syslog priority journald reads.
- ``json``: one object per line (``time``, ``level``, ``namespace``,
  ``node``, ``message``, the message's fields, ``failure``) for a log
  shipper. Only fields the message names are written, never the rest of
  the event, so nothing a module attached for its own use leaks out.

Choose with ``twistd paxchat --log-format json`` or ``PAXCHAT_LOG_FORMAT``;
``PAXCHAT_LOG_LEVEL`` (debug, info, warn, error, critical; ``warning``, journalctl's
name, is ``warn``) sets the level.
``twistd --logger paxchat.logs.observer`` also works, from the environment.
"""

import datetime
import json
import os
import string
import sys

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, formatEvent)
from zope.interface import provider

__all__ = ["FORMATS", "LEVELS", "LogFormatError", "checked_level", "filtered", "format_json",
           "format_text", "make_observer", "observer", "observer_from_environment"]

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warn", "error", "critical")
# Other names for a level: journalctl's (``journalctl -p warning``) for Twisted's.
_LEVEL_ALIASES = {"warning": "warn"}
# syslog priorities, as journald reads them from a "<N>" line prefix.
_PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
             LogLevel.critical: 2}
_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}
_PLAIN = (str, int, float, bool, type(None))


class LogFormatError(ValueError):
    """An unknown log format or level; the message lists the known ones."""


def _one_line(text):
    return text.translate(_ESCAPES)


def _level(event):
    return getattr(event.get("log_level"), "name", "info")


def _message(event):
    text = formatEvent(event) if event.get("log_format") is not None else ""
    if not text and "message" in event and isinstance(event["message"], tuple):
        text = " ".join(str(m) for m in event["message"])  # legacy twisted.python.log.msg
    return text


def _failure_text(event):
    failure = event.get("log_failure")
    if failure is None:
        return None
    try:
        return failure.getTraceback()
    except Exception:
        return f"{failure.type.__name__}: {failure.getErrorMessage()}"


def _time(event):
    when = event.get("log_time")
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def format_text(event, journal=False):
    """The event as one line of text (no newline at the end)."""
    message = _message(event)
    failure = _failure_text(event)
    if failure:
        message = f"{message}: {failure}" if message else failure
    namespace = event.get("log_namespace", "-")
    if journal:
        priority = _PRIORITY.get(event.get("log_level"), 6)
        return f"<{priority}>{_level(event)} [{namespace}] {_one_line(message)}"
    return f"{_time(event) or '-'} {_level(event)} [{namespace}] {_one_line(message)}"


def _named_fields(event):
    """The values of the fields the event's format string names, JSON-ready."""
    fmt = event.get("log_format")
    if not isinstance(fmt, str):
        return {}
    fields = {}
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return {}
    for _, name, _, _ in parsed:
        if not name:
            continue
        key = name.split(".", 1)[0].split("[", 1)[0].rstrip("()")
        if not key or key.startswith("log_") or key not in event or key in fields:
            continue
        value = event[key]
        fields[key] = value if isinstance(value, _PLAIN) else str(value)
    return fields


def format_json(event, node=None):
    """The event as one JSON object on one line (no newline at the end)."""
    record = {"time": _time(event), "level": _level(event),
              "namespace": event.get("log_namespace")}
    if node is not None:
        record["node"] = node
    record["message"] = _message(event)
    for key, value in _named_fields(event).items():
        record.setdefault(key, value)
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = {"type": getattr(failure.type, "__name__", str(failure.type)),
                             "message": failure.getErrorMessage(),
                             "traceback": _failure_text(event)}
    return json.dumps(record, ensure_ascii=False, default=str, allow_nan=True)


def _stdout_is_journal(stream):
    """True when ``stream`` is the journal socket systemd handed us ($JOURNAL_STREAM)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def make_observer(fmt="text", stream=None, level="info", node=None, journal=None):
    """An ILogObserver writing each event at ``level`` or above as one line to ``stream``.

    ``stream`` defaults to stdout as it is now: twistd later replaces
    ``sys.stdout`` by a file that logs, which must not be written to from
    here. ``journal`` defaults to whether that stream is journald.
    """
    if fmt not in FORMATS:
        raise LogFormatError(f"unknown log format {fmt!r} (use {' or '.join(FORMATS)})")
    level = checked_level(level)
    out = stream or sys.stdout
    if journal is None:
        journal = _stdout_is_journal(out)

    @provider(ILogObserver)
    def write(event):
        try:
            if fmt == "json":
                line = format_json(event, node)
                if journal:
                    line = f"<{_PRIORITY.get(event.get('log_level'), 6)}>{line}"
            else:
                line = format_text(event, journal)
        except Exception as e:  # a broken event must not take the logging down
            line = f"<3>error [paxchat.logs] could not format a log event: {e!r}" if journal else \
                f"- error [paxchat.logs] could not format a log event: {e!r}"
        try:
            out.write(line + "\n")
        except UnicodeEncodeError:
            # A lone surrogate (JSON lets a client spell one) or a character
            # the stream's encoding lacks: written as its escape, not lost.
            encoding = getattr(out, "encoding", None) or "utf-8"
            out.write(line.encode(encoding, "backslashreplace").decode(encoding) + "\n")
        out.flush()

    return filtered(write, level)


def checked_level(level):
    """``level`` as one of LEVELS (any case, spaces around, ``warning`` for ``warn``),
    or LogFormatError."""
    name = level.strip().lower()
    name = _LEVEL_ALIASES.get(name, name)
    if name not in LEVELS:
        raise LogFormatError(f"unknown log level {level!r} (use one of {', '.join(LEVELS)};"
                             " warning is warn)")
    return name


# Twisted's reconnecting client logs each retry it schedules ("Scheduling
# retry 12 to connect ..."): a line per peer per backoff step while a node
# is down, most of a node's log, and said already by the peer links' own
# lines. Shown at debug only.
_CHATTY_AT_INFO = ("twisted.application._client_service",)


def filtered(observer, level):
    """``observer`` handed only the events at ``level`` or above (LogFormatError if unknown)."""
    level = checked_level(level)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    if level == "info":
        for namespace in _CHATTY_AT_INFO:
            predicate.setLogLevelForNamespace(namespace, LogLevel.warn)
    return FilteringLogObserver(observer, [predicate])


def observer_from_environment(environ=None, stream=None, node=None, fmt=None, level=None):
    """make_observer with format and level from PAXCHAT_LOG_FORMAT / PAXCHAT_LOG_LEVEL."""
    environ = os.environ if environ is None else environ
    fmt = fmt or environ.get("PAXCHAT_LOG_FORMAT") or "text"
    level = level or environ.get("PAXCHAT_LOG_LEVEL") or "info"
    return make_observer(fmt.strip().lower(), stream=stream, level=level, node=node)


def observer():
    """For ``twistd --logger paxchat.logs.observer``: the observer the environment asks for."""
    return observer_from_environment()


class Occasional:
    """Counts a recurring event and says when to log it: at most once every
    ``interval`` seconds of ``clock``, so a storm of them is one line a
    minute that says how many there were, not a flooded log."""

    def __init__(self, clock, interval):
        self._clock = clock
        self._interval = interval
        self._count = 0
        self._next = None

    def happened(self):
        """Count one; how many to report since the last line if a line is due now, else 0."""
        self._count += 1
        now = self._clock.seconds()
        if self._next is not None and now < self._next:
            return 0
        self._next = now + self._interval
        count, self._count = self._count, 0
        return count


class OccasionalByKind:
    """An L{Occasional} for each kind of a recurring event (a peer, a task)."""

    def __init__(self, clock, interval):
        self._clock = clock
        self._interval = interval
        self._kinds = {}

    def happened(self, kind):
        """Count one of ``kind``; as L{Occasional.happened}."""
        occasional = self._kinds.get(kind)
        if occasional is None:
            occasional = self._kinds[kind] = Occasional(self._clock, self._interval)
        return occasional.happened()
