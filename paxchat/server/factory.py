"""The client-facing server of one node: builds a ChatProtocol per connection.

It owns what the connections of a node share: the registry of logged-in
connections, the per-account rate limits, the password hasher, and the
observer on the command log that pushes events to connections.
"""

from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .handlers import Handlers
from .passwords import PasswordHasher
from .protocol import ChatProtocol
from .push import EventPusher
from .ratelimit import KeyedRateLimiter
from .sessions import ConnectionRegistry

_log = Logger()


class ChatServerFactory(ServerFactory):
    """``ChatServerFactory(reactor, log, worker, settings)``.

    @param log: an ``ICommandLog`` (``LocalLog`` or the replicated log).
    @param worker: a ``StateWorker`` for reads of the local ``ChatState``.
    @param settings: a ``ServerSettings``.
    @param run_in_thread: ``f(fn, *args) -> Deferred`` for bcrypt; by default
        the reactor's thread pool.
    """

    def __init__(self, reactor, log, worker, settings, run_in_thread=None):
        self.reactor = reactor
        self.log = log
        self.worker = worker
        self.settings = settings
        if run_in_thread is None:
            def run_in_thread(fn, *args):
                return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)
        self.hasher = PasswordHasher(settings.bcrypt_cost, run_in_thread)
        self.registry = ConnectionRegistry()
        self.handlers = Handlers(
            reactor, log, worker, settings, self.hasher, self.registry,
            login_per_account=KeyedRateLimiter(reactor, settings.login_per_account),
            writes_per_account=KeyedRateLimiter(reactor, settings.writes_per_account),
        )
        log.add_observer(EventPusher(self.registry))
        self._warmed = False

    def startFactory(self):
        if not self._warmed:
            self._warmed = True
            self.hasher.warm_up().addErrback(
                lambda failure: _log.failure("making the dummy password hash failed", failure))

    def buildProtocol(self, addr):
        protocol = ChatProtocol(self.reactor, self.settings, self.handlers, self.registry)
        protocol.factory = self
        return protocol
