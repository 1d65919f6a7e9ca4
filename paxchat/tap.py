"""``twistd paxchat --config cluster.ini --node N``: one node as a twistd service.

Mistakes a person can fix (a bad cluster.ini, an unknown node, missing
certificates, a port in use) end twistd with one line saying what to fix,
not a traceback.
"""

import gc
import os
import signal
import sqlite3
import sys

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, LegacyLogObserverWrapper, Logger
from twisted.python import usage

from paxchat import config as configmod
from paxchat import logs, tls
from paxchat.lineage import LineageError
from paxchat.paxos.store import StorageError
from paxchat.state.chat import NewerThanThisBuild
from paxchat.state.kv import StoreError

log = Logger()

# What a person can fix from the message alone; anything else also gets its traceback logged.
_PLAIN_ERRORS = (configmod.ConfigError, tls.CertificateFilesError, OSError, CannotListenError,
                 sqlite3.Error, StoreError, LineageError, StorageError, NewerThanThisBuild)


class Options(usage.Options):
    synopsis = "--config cluster.ini --node N"
    longdesc = "Run node N of the paxchat cluster that cluster.ini describes."
    optParameters = [
        ["config", "c", "cluster.ini", "The cluster's configuration file."],
        ["node", None, None, "This node's id: the N of a [node.N] section (required).", int],
        ["log-format", None, None,
         "One line per event: text or json (default: $PAXCHAT_LOG_FORMAT, else twistd's log)."],
        ["log-level", None, None,
         "debug, info, warn (or warning), error or critical (default: $PAXCHAT_LOG_LEVEL,"
         " else info)."],
    ]

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            _refuse(self, e)

    def postOptions(self):
        if self["node"] is None:
            raise usage.UsageError("--node is required: which [node.N] of the cluster to run")
        self["cluster"] = _load(self["config"], self["node"])
        self["log_observer"] = _log_observer(self)


def _refuse(options, error):
    """Raise ``error``; under twistd, end the process with it as one line on stderr instead,
    as twistd would print its whole usage above it (or a traceback, from makeService)."""
    if getattr(options, "parent", None) is None:
        raise error
    print(f"paxchat: {error}", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(1) from None


def _log_observer(options):
    """What the node logs to: paxchat's one-line format if one was asked for, else
    twistd's own log; either at the level asked for (info by default, so no debug)."""
    fmt = options.get("log-format") or os.environ.get("PAXCHAT_LOG_FORMAT")
    level = options.get("log-level") or os.environ.get("PAXCHAT_LOG_LEVEL") or "info"
    try:
        if fmt:
            return logs.observer_from_environment(node=options["node"], fmt=fmt, level=level)
        level = logs.checked_level(level)
    except logs.LogFormatError as e:
        raise usage.UsageError(str(e)) from None
    twistd_log = _twistd_observer(options.parent)
    return None if twistd_log is None else logs.filtered(twistd_log, level)


def _twistd_observer(twistd_options):
    """The observer twistd would log to by itself (its --logfile, --syslog...), or None
    outside twistd or when twistd was given its own --logger."""
    if twistd_options is None or twistd_options.get("logger"):
        return None
    try:
        # twistd's own choice of observer, through a private (if long-stable) door:
        # a Twisted without it logs as twistd does, only unfiltered, and says so.
        from twisted.scripts.twistd import _SomeApplicationRunner
        observer = _SomeApplicationRunner.loggerFactory(twistd_options)._getLogObserver()
    except Exception as e:
        print(f"paxchat: --log-level applies only with --log-format here ({e!r});"
              " logging every level", file=sys.stderr)
        return None
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)        # --syslog's
    return observer


def _load(path, node_id):
    """The checked config, and the node's certificates readable if it serves TLS."""
    try:
        cluster = configmod.load(path)
        cluster.node(node_id)
        if cluster.client_tls:
            tls.load_ca(cluster)
            tls.load_node_certificate(cluster, node_id)
        return cluster
    except (configmod.ConfigError, tls.CertificateFilesError) as e:
        raise usage.UsageError(str(e)) from None


class _ExitOnStartupFailure(service.MultiService):
    """Ends the process with one line on stderr if the node cannot start.

    twistd starts services before the reactor runs; an exception there
    would otherwise print a traceback, or leave a half-started node behind.
    """

    def __init__(self, node, log_observer=None):
        super().__init__()
        self.node = node
        self.log_observer = log_observer
        node.setServiceParent(self)

    def setServiceParent(self, parent):
        # twistd hands us its application before it starts logging, and logs
        # to the ILogObserver component of it when one is set.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self):
        self._or_exit(super().privilegedStartService)

    def startService(self):
        self._or_exit(super().startService)

    def _or_exit(self, start):
        try:
            start()
        except Exception as e:
            if not isinstance(e, _PLAIN_ERRORS):
                log.failure("node {node_id} failed to start", node_id=self.node.node_id)
            say_start_failure(f"paxchat node {self.node.node_id} could not start: {e}")
            raise SystemExit(1) from None


def say_start_failure(text, stderr=None):
    """Say why the node cannot start, once, where its operator will look.

    On the process's own stderr: twistd has put a logging file in
    sys.stderr by now, whose lines the --log-level may drop. A daemon (no
    ``-n``) has its stderr on /dev/null: there, it goes to the log instead.
    """
    stderr = stderr or sys.__stderr__ or sys.stderr
    print(text, file=stderr)
    stderr.flush()
    if _goes_nowhere(stderr):
        log.critical("{text}", text=text)


def _goes_nowhere(stream):
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))
    except (AttributeError, OSError, ValueError):
        return False


# How long a thread may hold the GIL before another may take it (Python's
# default is 5 ms). A node's reactor thread shares the GIL with the threads
# that apply commands to SQLite and write the Paxos log; at the default it
# waited up to 5 ms behind an apply on every turn. 0.5 ms gave ~10 % more
# writes/s and a lower p99 at 64 clients (docs/performance.md).
GIL_SWITCH_INTERVAL = 0.0005


def makeService(options):
    """The node service for ``options`` (config errors raise UsageError)."""
    from twisted.internet import reactor

    from paxchat.clocks import run_timers_on_monotonic_time
    from paxchat.node import NodeService

    # Before the node schedules anything: a stepped wall clock must not stall
    # or rush its heartbeats, elections and timeouts (paxchat/clocks.py).
    run_timers_on_monotonic_time(reactor)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)

    cluster = options.get("cluster") or _load(options["config"], options["node"])
    try:
        node = NodeService(cluster, options["node"], reactor)
    except _PLAIN_ERRORS as e:
        _refuse(options, usage.UsageError(str(e)))
    # What start-up built (modules, the node's objects: ~50,000 tracked
    # objects) lives as long as the process; frozen, the cyclic collector
    # stops walking it. Under load each node ran a full collection every
    # 2-5 s that held the GIL 20-70 ms; after this, none over 20 ms.
    gc.collect()
    gc.freeze()
    reactor.callWhenRunning(reload_on_sighup, reactor, node)
    return _ExitOnStartupFailure(node, options.get("log_observer"))


def reload_on_sighup(reactor, node):
    """SIGHUP (``systemctl reload``) makes the node take cluster.ini again
    (``NodeService.reload``), instead of ending the process as it would by
    default."""
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(node.reload))
