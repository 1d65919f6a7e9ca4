"""Wire the interactive prompt to the terminal and the cluster.

Standard input and output go through ``twisted.internet.stdio`` so that
messages pushed by the server are printed while the prompt waits; the
program ends on ``quit`` or end of input.
"""

from __future__ import annotations

from twisted.internet import defer, stdio

from .credentials import PASSWORD_ENV, SessionCache
from .errors import ServerError
from .explain import explain
from .shell import Shell, ShellProtocol

__all__ = ["run_interactive"]


@defer.inlineCallbacks
def startup_login(shell: Shell, username: str, cache: SessionCache | None):
    """--user given: resume the cached session, or log in with the password.

    Fires True once logged in; else False, having said why (the shell's
    status becomes 1). The caller then ends the program: a prompt left
    logged out, not as the user asked for, would fail each command with
    "log in first" (fed from a pipe, every line).
    """
    client = shell.client
    token = cache.load(username) if cache is not None else None
    shell.starting = True
    try:
        if token:
            try:
                result = yield client.resume(token)
                shell.note(f"Logged in as {username}; {result.get('unread', 0)} unread message(s).")
                return True
            except ServerError as e:
                if e.code != "bad_session":
                    raise
                cache.forget(username)
        password = yield shell.ask_password(f"Password for {username}: ")
        result = yield client.login(username, password)
        if cache is not None:
            cache.save(username, result["session"])
        shell.note(f"Logged in as {username}; {result.get('unread', 0)} unread message(s).")
        return True
    except EOFError:
        shell.fail(f"Error: no password for {username}: the input ended"
                   f" (set {PASSWORD_ENV}, or give it as the first line)")
    except Exception as e:
        shell.fail(f"Error: {explain(e)}")
    finally:
        shell.starting = False
    return False


def run_interactive(reactor, config, args, console) -> defer.Deferred:
    """Run the prompt until quit; fires with the exit status."""
    from .cli import make_client

    done = defer.Deferred()
    holder = {}

    def on_event(event):
        if "shell" in holder:
            holder["shell"].on_event(event)

    def on_status(status):
        if "shell" in holder:
            holder["shell"].on_status(status)
        if "proto" in holder:
            # A start-up login that fails this way says so itself, and ends the program.
            holder["proto"].offline(status.state == "failed" and not holder["shell"].starting)

    client = make_client(reactor, config, args, on_event=on_event, on_status=on_status)
    # Ctrl-C stops the reactor, which drops the connection: closed first, the
    # client does not say it lost it and is reconnecting as the program ends.
    reactor.addSystemEventTrigger("before", "shutdown", client.close)
    cache = None if args.no_session_cache else SessionCache()

    def make_shell(proto):
        shell = Shell(client, proto.write, proto.ask_secret, lambda: proto.transport.loseConnection(),
                      password=console.env.get(PASSWORD_ENV), note=proto.note)
        holder["shell"] = shell
        holder["proto"] = proto
        if args.user:
            # Not logged in as asked: said why, and ends with status 1 before any command runs.
            proto.run_first(lambda: startup_login(shell, args.user, cache).addCallback(
                lambda ok: None if ok else proto.end()))
        else:
            proto.run_first(lambda: client.connect().addErrback(
                lambda f: shell.fail("Error: " + explain(f))))
        return shell

    stdio.StandardIO(ShellProtocol(make_shell, done), reactor=reactor)

    def finish(status):
        return client.close().addCallback(lambda _: status or 0)

    return done.addCallback(finish)
