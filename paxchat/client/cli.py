"""``paxchat``: the command-line client, interactive or one command at a time.

    paxchat --config cluster.ini [--node N] [--user U]          interactive prompt
    paxchat --config cluster.ini create-account alice
    paxchat --config cluster.ini --user alice send bob "hi there"    (or: send bob hi there)
    paxchat --config cluster.ini --user alice read | history [--peer bob] | list 'a*'
    paxchat --config cluster.ini --user alice delete 12 13 | delete-account | logout
    paxchat --config cluster.ini --user alice settings [--read-receipts on|off]

Every failure is one line on stderr (exit status 1; 2 for usage and config
mistakes; 130 for a command interrupted by Ctrl-C), never a traceback. A
command that finds no node accepting connections says so on stderr once,
and waits on until its --timeout (nodes restart).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from twisted.internet import defer

from paxchat import closedpipe

from .checks import check_body, check_limit, check_password, check_pattern, check_username
from .cli_format import (
    HISTORY_LIMIT, READ_LIMIT, format_accounts, format_history, format_read, format_settings, not_accepting,
    older_hint, sent,
)
from .credentials import NoPassword, SessionCache, ask_without_echo, get_password
from .errors import ServerError
from .explain import explain

__all__ = ["build_parser", "main", "run_command"]

USER_ENV = "PAXCHAT_USER"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paxchat", description="Chat on a paxchat cluster. Without a command: an interactive prompt.",
        epilog="Every password comes from $PAXCHAT_PASSWORD when it is set (at the prompt too),"
               " else it is asked for without echo.")
    parser.add_argument("--config", default=os.environ.get("PAXCHAT_CONFIG", "cluster.ini"),
                        help="the cluster.ini naming the nodes (default: ./cluster.ini or $PAXCHAT_CONFIG)")
    parser.add_argument("--node", type=int, help="try this node first (default: a random node of the config)")
    parser.add_argument("--user", default=os.environ.get(USER_ENV),
                        help="your username (default: $PAXCHAT_USER)")
    parser.add_argument("--no-session-cache", action="store_true",
                        help="do not keep the session in ~/.config/paxchat between commands")
    parser.add_argument("--timeout", type=_seconds, default=15.0, metavar="SECONDS",
                        help="give up on a request (logging in, then the command) that the cluster"
                             " has not answered this many seconds after it was made (default: %(default)g)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, text):
        """A subcommand whose --help says what it does, as the list of commands does."""
        return sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}.")

    p = command("create-account", "create an account (password asked twice)")
    p.add_argument("username", type=_arg(check_username), help="1 to 32 of A-Z a-z 0-9 _ . -")
    p = command("send", "send a message")
    p.add_argument("to", help="the recipient's username")
    p.add_argument("body", nargs="+", action=_JoinWords, metavar="MESSAGE",
                   help="the message: its words, joined with one space as at the prompt"
                        " (quote it to keep its spacing or line breaks)")
    p = command("read", "show unread messages (oldest first) and mark them read")
    p.add_argument("--limit", type=_arg(check_limit), default=READ_LIMIT,
                   help="at most this many messages (default: %(default)s)")
    p = command("history", "recent messages, sent and received (oldest first)")
    p.add_argument("--peer", help="only the conversation with this user")
    p.add_argument("--before", type=_positive, help="only messages older than this message id")
    p.add_argument("--limit", type=_arg(check_limit), default=HISTORY_LIMIT,
                   help="at most this many messages (default: %(default)s)")
    p = command("list", "accounts matching a pattern with * and ?")
    p.add_argument("pattern", nargs="?", default="*", type=_arg(check_pattern),
                   help="1 to 64 of A-Z a-z 0-9 _ . - * ? (default: %(default)s)")
    p.add_argument("--limit", type=_arg(check_limit), default=100,
                   help="at most this many names (default: %(default)s)")
    p.add_argument("--after", default="", help="continue after this name")
    p = command("delete", "delete messages by id, for both parties")
    p.add_argument("ids", nargs="+", type=_positive, metavar="ID",
                   help="a message's id, as read and history show it (#12 is 12)")
    command("delete-account", "delete your account (asks for the password)")
    command("logout", "end the session kept on this machine")
    p = command("settings", "show your settings, or change one")
    p.add_argument("--read-receipts", type=_on_off, metavar="on|off",
                   help="tell senders when you read their messages, and be told when yours are"
                        " read (off: neither)")
    return parser


def _arg(check):
    """An argparse type from a check of checks.py, keeping its sentence."""
    def convert(text):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


class _JoinWords(argparse.Action):
    """``send bob hello world`` sends "hello world", as ``send bob hello world`` at the prompt does."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, check_body(" ".join(values)))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _on_off(text):
    choices = {"on": True, "off": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"{text!r} is neither on nor off")
    return choices[text.lower()]


def _positive(text):
    try:
        value = int(str(text).lstrip("#"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _ask_name(prompt: str) -> str:
    """A username typed at the terminal; none from a pipe or /dev/null, where a
    prompt would only land in the output before the error."""
    try:
        terminal = sys.stdin.isatty()
    except (AttributeError, ValueError):     # no standard input, or a closed one
        terminal = False
    if not terminal:
        raise EOFError("no terminal")
    return input(prompt)


@dataclass
class Console:
    """Where output goes and where input comes from (swapped in tests)."""

    out: Callable[[str], None] = field(default=lambda text: print(text, flush=True))
    err: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr, flush=True))
    ask: Callable[[str], str] = field(default=None)
    ask_name: Callable[[str], str] = field(default=_ask_name)
    env: dict = field(default_factory=lambda: os.environ)
    # The reader of ``out`` went away (``paxchat ... | head``).
    out_closed: Callable[[], None] = field(default=lambda: closedpipe.discard(sys.stdout))

    def __post_init__(self):
        if self.ask is None:
            self.ask = ask_without_echo


class CommandFailed(Exception):
    """A failure already explained to the user; carries the exit status."""

    def __init__(self, message, status=EXIT_FAILED):
        super().__init__(message)
        self.status = status


# -- one-shot commands -----------------------------------------------------------

def _username(args, console) -> str:
    if args.user:
        return args.user
    try:
        name = console.ask_name("Username: ").strip()
    except (EOFError, KeyboardInterrupt):
        name = ""
    if not name:
        raise CommandFailed("give a username with --user or $PAXCHAT_USER", EXIT_USAGE)
    return name


def _password(console, prompt="Password: ", confirm=False) -> str:
    try:
        # A new one (confirm) is checked before it is typed again, not after.
        return get_password(prompt, confirm=confirm, env=console.env, ask=console.ask,
                            check=check_password if confirm else None)
    except NoPassword as e:
        hint = " (set PAXCHAT_PASSWORD or run in a terminal)" if e.no_terminal else ""
        raise CommandFailed(f"{e}{hint}", EXIT_USAGE) from None


@defer.inlineCallbacks
def ensure_session(client, username, console, cache: SessionCache | None):
    """Attach to the cached session if it still works, else log in with the password."""
    token = cache.load(username) if cache is not None else None
    if token:
        try:
            yield client.resume(token)
            return
        except ServerError as e:
            if e.code != "bad_session":
                raise
            cache.forget(username)
    password = _password(console, f"Password for {username}: ")
    result = yield client.login(username, password)
    if cache is not None and result.get("session"):
        cache.save(username, result["session"])


@defer.inlineCallbacks
def _logout(client, username, console, cache: SessionCache | None):
    """End the session kept on this machine. Without one there is nothing to end:
    logging in (a password, a bcrypt check) only to log out would end nothing."""
    token = cache.load(username) if cache is not None else None
    if not token:
        console.out(f"No session of {username} is kept here: nothing to log out.")
        return
    try:
        yield client.resume(token)
        yield client.logout()
    except ServerError as e:
        if e.code != "bad_session":
            raise                       # kept, to try again
    cache.forget(username)
    console.out(f"Logged out {username}.")


@defer.inlineCallbacks
def run_command(client, args, console: Console, cache: SessionCache | None):
    """Run one subcommand against a connected-or-connecting client; print its result."""
    out = console.out
    if args.command == "create-account":
        password = _password(console, f"Choose a password for {args.username}: ", confirm=True)
        yield client.create_account(args.username, password)
        out(f"Account {args.username} created.")
        return
    username = _username(args, console)
    if args.command == "delete-account":
        # Always the password again, even with a cached session: this cannot be undone.
        password = _password(console, f"Password to delete {username} for good: ")
        yield ensure_session(client, username, console, cache)
        yield client.delete_account(password)
        if cache is not None:
            cache.forget(username)
        out(f"Account {username} deleted.")
        return
    if args.command == "logout":
        yield _logout(client, username, console, cache)
        return
    yield ensure_session(client, username, console, cache)
    if args.command == "send":
        result = yield client.send_message(args.to, args.body)
        out(sent(result, args.to))
    elif args.command == "read":
        result = yield client.read_messages(args.limit)
        out(format_read(result, username))
    elif args.command == "history":
        result = yield client.history(peer=args.peer, before=args.before, limit=args.limit)
        out(format_history(result, username, args.peer))
        hint = older_hint(result)
        if hint:
            out(hint)
    elif args.command == "list":
        result = yield client.list_accounts(args.pattern, args.limit, args.after)
        out(format_accounts(result.get("accounts", []), result.get("more", False)))
    elif args.command == "delete":
        result = yield client.delete_messages(args.ids)
        out(f"Deleted {result.get('deleted', 0)} message(s).")
    elif args.command == "settings":
        if args.read_receipts is None:
            result = yield client.get_settings()
        else:
            result = yield client.set_settings(args.read_receipts)
        out(format_settings(result))


# -- entry point -------------------------------------------------------------------

def _load_config(path):
    from paxchat.config import ConfigError, load
    try:
        return load(path)
    except ConfigError as e:
        raise CommandFailed(str(e), EXIT_USAGE) from None


def failover_policy(timeout: float):
    """``--timeout`` bounds every request, from connecting through any retries, to its answer."""
    from .failover import FailoverPolicy
    return FailoverPolicy(deadline=timeout, connect_timeout=min(5.0, timeout), call_timeout=timeout)


def make_client(reactor, config, args, **kwargs):
    """A PaxchatClient for the config, or CommandFailed when TLS files are missing."""
    from .api import PaxchatClient
    if args.node is not None and args.node not in config.nodes:
        known = ", ".join(str(n) for n in config.nodes)
        raise CommandFailed(f"--node {args.node}: no such node in {config.path} (nodes are {known})", EXIT_USAGE)
    policy = failover_policy(args.timeout)
    try:
        return PaxchatClient.from_config(reactor, config, prefer_node=args.node, policy=policy, **kwargs)
    except Exception as e:  # missing/unreadable CA certificate and the like
        raise CommandFailed(f"cannot set up TLS: {e}", EXIT_USAGE) from None


def _waiting_notice(console):
    """An ``on_status`` that says once, on stderr, that no node accepts connections and the
    command waits on: else it would sit silent for its whole --timeout."""
    said = []

    def on_status(status):
        if status.not_accepted and not said:
            said.append(status)
            console.err(f"paxchat: {not_accepting(status)}.")
    return on_status


@defer.inlineCallbacks
def run(reactor, args, console: Console | None = None):
    """Everything main() does once arguments are parsed; fires with the exit status."""
    console = console or Console()
    client = None
    try:
        config = _load_config(args.config)
        cache = None if args.no_session_cache else SessionCache()
        if args.command is None:
            from .interactive import run_interactive
            status = yield run_interactive(reactor, config, args, console)
            return status
        client = make_client(reactor, config, args, on_status=_waiting_notice(console))
        yield run_command(client, args, console, cache)
        return EXIT_OK
    except CommandFailed as e:
        console.err(f"paxchat: {e}")
        return e.status
    except defer.CancelledError:
        # Ctrl-C (see ``start``): a write may have reached the cluster, only its answer not us.
        console.err("paxchat: interrupted before the cluster answered;"
                    " a change asked for may or may not have been made.")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # What the reader wanted, it has: no word about it. A command prints
        # once it is done, so it did what it was asked (paxchat/closedpipe.py).
        console.out_closed()
        return EXIT_OK
    except Exception as e:
        console.err(f"paxchat: {explain(e)}")
        return EXIT_FAILED
    finally:
        if client is not None:
            yield client.close()


def start(reactor, args, console: Console | None = None):
    """``run``, and a one-shot command given up on Ctrl-C (the reactor stopping) with status 130.

    Else the reactor would stop with the command unanswered and the
    program end with status 0, as if it had been done. The prompt ends
    on Ctrl-C as on ``quit``.
    """
    d = run(reactor, args, console)
    if args.command is None:
        return d

    def interrupted():
        if d.called:
            return None
        stopped = defer.Deferred()       # the reactor stops once the command is given up
        d.addBoth(lambda result: (stopped.callback(None), result)[1])
        d.cancel()
        return stopped
    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    return d


def main(argv=None):
    args = build_parser().parse_args(argv)
    from twisted.internet import task

    def begin(reactor):
        d = start(reactor, args)

        def finish(status):
            if status:
                raise SystemExit(status)
        return d.addCallback(finish)

    task.react(begin)


if __name__ == "__main__":
    main()
