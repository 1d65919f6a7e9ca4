"""The client-facing server of one node: builds a ChatProtocol per connection.

It owns what the connections of a node share: the registry of logged-in
connections, the per-account rate limits, the password hasher, the
observer on the command log that pushes events to connections, and the
one on its leader that tells the connections following it.
"""

import itertools
from dataclasses import replace

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from paxchat.logs import Occasional

from .handlers import Handlers
from .bcryptprocess import BcryptStopped, ProcessBcrypt
from .passwords import PasswordHasher
from .protocol import ChatProtocol, OutputDebt
from .push import EventPusher, LeaderEvents
from .ratelimit import KeyedRateLimiter
from .sessions import ConnectionRegistry

_log = Logger()

# A node turning connections away logs it at most this often (each reason).
TURNED_AWAY_LOG_SECONDS = 60.0
# A node at max_clients makes room for a new connection by closing one that
# has been open this long without logging in (and is not waiting for an answer).
STRANGER_GRACE_SECONDS = 30.0
# How many of the oldest not-logged-in connections one look for room examines.
_ROOM_SEARCH = 64
# After aborting the last connections at a stop, how long to wait for them to be gone.
ABORT_WAIT_SECONDS = 1.0


class ChatServerFactory(ServerFactory):
    """``ChatServerFactory(reactor, log, worker, settings)``.

    @param log: an ``ICommandLog`` (``LocalLog`` or the replicated log).
    @param worker: a ``StateWorker`` for reads of the local ``ChatState``.
    @param settings: a ``ServerSettings``.
    @param bcrypt: the password hasher's backend; by default a
        L{ProcessBcrypt} (a child process, started on the first hash).
    """

    def __init__(self, reactor, log, worker, settings, bcrypt=None):
        self.reactor = reactor
        self.log = log
        self.worker = worker
        self.settings = settings
        if bcrypt is None:
            bcrypt = ProcessBcrypt(reactor)
        self.hasher = PasswordHasher(settings.bcrypt_cost, bcrypt)
        self.registry = ConnectionRegistry()
        # Connections that asked hello for leader events (logged in or not).
        self.leader_events = LeaderEvents(reactor, log.leader_id)
        self.handlers = Handlers(
            reactor, log, worker, settings, self.hasher, self.registry,
            login_per_account=KeyedRateLimiter(reactor, settings.login_per_account),
            writes_per_account=KeyedRateLimiter(reactor, settings.writes_per_account),
            leader_events=self.leader_events,
        )
        log.add_observer(EventPusher(self.registry))
        log.add_leader_observer(self.leader_events.changed)
        self.connections = set()  # every open ChatProtocol, logged in or not
        self.output_debt = OutputDebt()  # events owed by connections whose output is full
        self.turned_away_total = 0  # connections turned away at max_clients
        # New connections by IP address; those over connections_per_address are closed unread.
        self._accepts = KeyedRateLimiter(reactor, settings.connections_per_address)
        self.refused_total = 0
        self._refused_report = Occasional(reactor, TURNED_AWAY_LOG_SECONDS)
        # Connections not known to have logged in, oldest first: conn -> when it connected.
        self._strangers = {}
        self._turned_away_report = Occasional(reactor, TURNED_AWAY_LOG_SECONDS)
        self._warmed = False

    def use_nodes(self, nodes):
        """The cluster's client addresses changed (cluster.ini reloaded): ``hello`` says so."""
        self.settings = replace(self.settings, nodes=tuple(nodes))
        self.handlers.use_nodes(nodes)

    def startFactory(self):
        if not self._warmed:
            self._warmed = True
            self.hasher.warm_up().addErrback(self._warm_up_failed)

    @staticmethod
    def _warm_up_failed(failure):
        if failure.check(BcryptStopped):
            return None              # the node stopped first: nothing is wrong
        _log.failure("making the dummy password hash failed", failure)

    def arrived(self, conn):
        """A connection was accepted: a stranger until it logs in."""
        self._strangers[conn] = self.reactor.seconds()

    def left(self, conn):
        """A connection closed: its reads and hashes not yet started are not worth running."""
        self._strangers.pop(conn, None)
        self.leader_events.forget(conn)
        self.worker.drop_reads(conn)
        self.handlers.left(conn)

    def make_room(self):
        """At ``max_clients``: close the oldest connection that never logged in, if it may go.

        It may go once it has been open ``STRANGER_GRACE_SECONDS`` and has no
        request waiting for an answer; it hears ``node_stopping`` (``full``),
        as a turned-away connection does. So connections that never log in
        cannot keep newcomers out, and logged-in clients are never displaced.
        Returns True if one was closed. Looks at a bounded number of the
        oldest, dropping from its list those that have logged in since.
        """
        strangers = self._strangers
        cutoff = self.reactor.seconds() - STRANGER_GRACE_SECONDS
        chosen, known = None, []
        for conn, since in itertools.islice(strangers.items(), _ROOM_SEARCH):
            if conn.session is not None or not conn.connected:
                known.append(conn)         # logged in (or gone): no longer a stranger
                continue
            if since > cutoff:
                break                      # the rest are younger still
            if conn.in_flight == 0:
                chosen = conn
                break
        for conn in known:
            del strangers[conn]
        if chosen is None:
            return False
        del strangers[chosen]
        self.turned_away()
        chosen.close_after_answers("full")
        return True

    def turned_away(self):
        """Count a connection turned away because the node is full; log it, once a minute at most."""
        self.turned_away_total += 1
        count = self._turned_away_report.happened()
        if count:
            _log.warn("{max_clients} client connections open (max_clients): turned away {count} "
                      "since the last report (new ones, or ones idle without logging in); "
                      "their clients move to another node",
                      max_clients=self.settings.max_clients, count=count)

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None)
        if host is not None and not self._accepts.allow(host):
            self._refuse(host)
            return None              # the port closes the socket: no TLS, nothing read
        protocol = ChatProtocol(self.reactor, self.settings, self.handlers, self.registry,
                                self.output_debt)
        protocol.factory = self
        return protocol

    def _refuse(self, host):
        """Count a connection refused for arriving too fast from its address; log it once a minute at most.

        Closing it at once costs the node next to nothing, where a TLS
        handshake costs a millisecond or more of CPU: a client reconnecting
        in a loop, or many from one address, cannot take the node's time.
        A paxchat client whose connection is closed tries another node.
        """
        self.refused_total += 1
        count = self._refused_report.happened()
        if count:
            _log.warn("closed {count} new client connections since the last report: they came "
                      "faster than connections_per_address ({rate:g}/s from one address, "
                      "the last from {host})",
                      count=count, rate=self.settings.connections_per_address.rate, host=host)

    def close_all(self, reason, grace):
        """Tell every client this node is stopping and close its connection; fires when all are gone.

        Each connection first gets the answers to the requests it already
        sent (for up to ``grace`` seconds), then ``{"event": "node_stopping",
        "reason": reason}``, then a clean close, so its client moves to another
        node and resends only what was never answered. A connection still
        open ``grace`` seconds later gets the event and is closed anyway;
        one that does not go away within another ``grace`` is aborted.
        Never fails.
        """
        conns = list(self.connections)
        if not conns:
            return defer.succeed(None)
        _log.info("telling {count} client connections that this node is stopping",
                  count=len(conns))
        for conn in conns:
            conn.close_after_answers(reason)
        finished = defer.Deferred()
        timers = []

        def finish(_=None):
            for timer in timers:
                if timer.active():
                    timer.cancel()
            if not finished.called:
                finished.callback(None)

        def answers_overdue():
            for conn in list(self.connections):
                conn.close_now()
            timers.append(self.reactor.callLater(grace, close_overdue))

        def close_overdue():
            for conn in list(self.connections):
                conn.transport.abortConnection()
            timers.append(self.reactor.callLater(ABORT_WAIT_SECONDS, finish))  # never hang a stop

        timers.append(self.reactor.callLater(grace, answers_overdue))
        defer.DeferredList([conn.when_closed() for conn in conns]).addCallback(finish)
        return finished
