"""The interactive ``paxchat`` prompt, kept inside the reactor.

``Shell`` interprets command lines against a PaxchatClient and prints
through a ``write`` function, so it is tested without a terminal;
``ShellProtocol`` connects it to ``twisted.internet.stdio`` so incoming
messages can be printed while the prompt waits for input.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from paxchat.limits import MAX_BODY_CHARS

from .checks import check_limit, check_password, check_pattern, check_username
from .cli_format import (HELP, HISTORY_LIMIT, READ_LIMIT, format_accounts, format_history, format_message,
                         format_read, format_settings, not_accepting, sent, visible)
from .errors import ClientError, UntrustedNodes
from .explain import explain

__all__ = ["MAX_INPUT_LINE", "Shell", "ShellProtocol"]

# Room for `send USER` and a longest message of 4-byte characters.
MAX_INPUT_LINE = 4 * MAX_BODY_CHARS + 1024


class Shell:
    """One interactive session: ``handle(line)`` runs a command and returns a Deferred.

    ``ask_secret(prompt)`` returns a Deferred with a line typed without echo;
    ``quit()`` ends the program. ``password`` (from PAXCHAT_PASSWORD) answers
    every password prompt instead, as it does for one-shot commands.
    ``failed`` becomes true once a command fails (an error, an unknown
    command, a usage mistake): the program then ends with status 1, so a
    script that pipes commands in can tell. ``note`` says what is not an
    answer (errors, the connection's comings and goings); by default it
    writes where answers go.
    """

    def __init__(self, client, write: Callable[[str], None],
                 ask_secret: Callable[[str], defer.Deferred], quit: Callable[[], None],
                 password: str | None = None, note: Callable[[str], None] | None = None):
        self.client = client
        self.write = write
        self.note = note or write
        self.ask_secret = ask_secret
        self.quit = quit
        self.password = password or None
        self.failed = False
        self.starting = False   # logging in as --user said, before the first command
        self.connected_to = None  # the node the last status said we are connected to
        self.commands = {
            "register": self.do_register, "login": self.do_login, "send": self.do_send,
            "read": self.do_read, "history": self.do_history, "list": self.do_list,
            "delete": self.do_delete, "delete-account": self.do_delete_account,
            "receipts": self.do_receipts, "logout": self.do_logout, "help": self.do_help,
            "quit": self.do_quit, "exit": self.do_quit,
        }

    @property
    def prompt(self) -> str:
        return f"{self.client.username or 'paxchat'}> "

    def handle(self, line: str) -> defer.Deferred:
        """Run one command line; errors are printed as sentences, never raised."""
        line = line.strip()
        if not line:
            return defer.succeed(None)
        name, _, rest = line.partition(" ")
        command = self.commands.get(name.lower())
        if command is None:
            self.fail(f"Unknown command {name!r}; type 'help' for the list.")
            return defer.succeed(None)
        d = defer.maybeDeferred(command, rest.strip())
        d.addErrback(lambda f: self.fail("Error: " + explain(f)))
        return d

    def fail(self, text: str):
        """Say what went wrong; the program's exit status will say so too."""
        self.failed = True
        self.note(text)

    def on_event(self, event: dict):
        """Print pushed messages as they arrive, and mark them read; what this
        account sent from elsewhere (``sent``), which needs no marking; and
        which of its messages were read (``seen``) or deleted elsewhere."""
        kind = event.get("event")
        if kind in ("message", "sent") and isinstance(event.get("message"), dict):
            message = event["message"]
            self.write(format_message(message, self.client.username))
            if kind == "message" and message.get("to") == self.client.username and "id" in message:
                self.client.mark_read([message["id"]]).addErrback(lambda f: None)
        elif kind in ("seen", "deleted") and isinstance(event.get("ids"), list):
            ids = ", ".join(f"#{i}" for i in event["ids"] if isinstance(i, int))
            if ids:
                self.write(f"{'Read by its recipient' if kind == 'seen' else 'Deleted'}: {ids}")
        elif kind == "settings" and isinstance(event.get("settings"), dict):
            self.write(format_settings(event["settings"]) + " (set elsewhere)")
        elif event.get("event") == "session_ended":
            reason = visible(str(event.get("reason", "no reason given")))
            self.note(f"Your session ended ({reason}); log in again.")

    def on_status(self, status):
        if status.not_accepted:
            text = not_accepting(status)
            self.note(f"{text[0].upper()}{text[1:]}.")
        elif status.state == "failed" and self.starting:
            pass                           # the start-up login says why, and the program ends
        elif status.state == "reconnecting" and status.no_majority:
            self.note(f"Servers answer, but too few are up to agree ({status.detail});"
                      " trying the others...")
        elif status.state == "reconnecting":
            why = f" ({status.detail})" if status.detail else ""
            self.note(f"Connection lost{why}; reconnecting to another server...")
        elif status.state == "connected":
            # Said again only for another node: the client reports each change of
            # leader as a "connected" status too, which the prompt does not show.
            if status.node != self.connected_to:
                self.note(f"Connected to node {status.node}.")
        elif status.state == "failed" and status.no_majority:
            self.note("Too few servers are up to agree on anything; commands will try again.")
        elif status.state == "failed" and isinstance(status.error, UntrustedNodes):
            self.note(f"TLS refused the servers' certificates ({status.error.problem});"
                      " commands will try again, reading ca.pem again.")
        elif status.state == "failed":
            self.note("Cannot reach any server; commands will try again.")
        self.connected_to = status.node if status.state == "connected" else None

    def ask_password(self, prompt: str) -> defer.Deferred:
        """The PAXCHAT_PASSWORD password if set, else one typed at ``prompt``."""
        if self.password is not None:
            return defer.succeed(self.password)
        return self.ask_secret(prompt)

    # -- commands -------------------------------------------------------------

    def _usage(self, text):
        self.fail("Usage: " + text)

    def _checked(self, check, text, usage):
        """``check(text)``, or None after saying what is wrong with it."""
        try:
            return check(text)
        except ValueError as e:
            self._usage(f"{usage} ({e})")
            return None

    @defer.inlineCallbacks
    def do_register(self, rest):
        if len(rest.split()) != 1:
            return self._usage("register USER")
        if self._checked(check_username, rest, "register USER") is None:
            return                      # said why, before a password was asked for
        password = yield self.ask_password("Choose a password: ")
        if self.password is None:         # a typed one is checked before it is typed again
            try:
                check_password(password)
            except ValueError as e:
                self.fail(f"Error: {e}; nothing was created.")
                return
        # A typed password is typed twice; PAXCHAT_PASSWORD needs no check.
        again = password if self.password is not None else (yield self.ask_secret("Repeat the password: "))
        if password != again:
            self.fail("The two passwords differ; nothing was created.")
            return
        yield self.client.create_account(rest, password)
        self.write(f"Account {rest} created. Log in with: login {rest}")

    @defer.inlineCallbacks
    def do_login(self, rest):
        if len(rest.split()) != 1:
            return self._usage("login USER")
        password = yield self.ask_password("Password: ")
        result = yield self.client.login(rest, password)
        self.write(f"Logged in as {rest}; {result.get('unread', 0)} unread message(s).")

    @defer.inlineCallbacks
    def do_send(self, rest):
        to, _, body = rest.partition(" ")
        if not to or not body.strip():
            return self._usage("send USER MESSAGE")
        result = yield self.client.send_message(to, body)
        self.write(sent(result, to))

    @defer.inlineCallbacks
    def do_read(self, rest):
        limit = self._checked(check_limit, rest or str(READ_LIMIT), "read [N]")
        if limit is None:
            return
        result = yield self.client.read_messages(limit)
        self.write(format_read(result, self.client.username))

    @defer.inlineCallbacks
    def do_history(self, rest):
        words = rest.split()
        peer = None
        if words and not words[0].isdigit():
            peer = words.pop(0)
        if len(words) > 1:
            return self._usage("history [PEER] [N]")
        limit = self._checked(check_limit, words[0] if words else str(HISTORY_LIMIT), "history [PEER] [N]")
        if limit is None:
            return
        result = yield self.client.history(peer=peer, limit=limit)
        self.write(format_history(result, self.client.username, peer))

    @defer.inlineCallbacks
    def do_list(self, rest):
        pattern = self._checked(check_pattern, rest or "*", "list [PATTERN]")
        if pattern is None:
            return
        result = yield self.client.list_accounts(pattern)
        self.write(format_accounts(result.get("accounts", []), result.get("more", False)))

    @defer.inlineCallbacks
    def do_delete(self, rest):
        ids = [w.lstrip("#") for w in rest.split()]
        if not ids or not all(i.isdigit() for i in ids):
            return self._usage("delete ID...")
        result = yield self.client.delete_messages([int(i) for i in ids])
        self.write(f"Deleted {result.get('deleted', 0)} message(s).")

    @defer.inlineCallbacks
    def do_delete_account(self, rest):
        if self.client.username is None:
            self.fail("You need to log in first.")
            return
        name = self.client.username
        password = yield self.ask_password(f"This deletes {name} and every message sent to it. Password: ")
        yield self.client.delete_account(password)
        self.write(f"Account {name} deleted.")

    @defer.inlineCallbacks
    def do_receipts(self, rest):
        choice = rest.strip().lower()
        if choice not in ("", "on", "off"):
            return self._usage("receipts [on|off]")
        if choice:
            result = yield self.client.set_settings(choice == "on")
        else:
            result = yield self.client.get_settings()
        self.write(format_settings(result))

    @defer.inlineCallbacks
    def do_logout(self, rest):
        yield self.client.logout()
        self.write("Logged out.")

    def do_help(self, rest):
        self.write(HELP)

    def do_quit(self, rest):
        self.quit()


class LineTooLong(ClientError):
    """An input line longer than any command needs: not run, and said so in its turn."""

    def __init__(self, limit: int):
        super().__init__(f"a line over {limit:,} bytes was not run"
                         f" (a message holds at most {MAX_BODY_CHARS:,} characters)")


@implementer(IHalfCloseableProtocol)
class ShellProtocol(LineReceiver):
    """stdin/stdout for a Shell: a prompt, no-echo password lines, output that does not mangle it.

    The prompt (and the banner, and the carriage return that starts each
    line over it) only when standard input is a terminal. Fed from a pipe,
    standard output gets the answers alone, plain lines for a script to
    read, and standard error what is not an answer (``note``: errors,
    password prompts, the connection's comings and goings).

    End of input (Ctrl-D, or the end of a file piped in) ends the program
    the way ``quit`` does, but only after every line read before it has run,
    so ``printf 'send bob hi\\n' | paxchat --user alice`` sends. Half-closeable,
    so stdout stays open while those lines still print. Once input has
    ended nobody is there to wait for the cluster to come back: when the
    client has tried every server in vain (``offline(True)``), the rest is
    given up and the program ends with status 1 (``done`` fires with it),
    as it does when any command failed (``Shell.failed``).
    """

    delimiter = os.linesep.encode()
    MAX_LENGTH = MAX_INPUT_LINE

    def __init__(self, make_shell: Callable[["ShellProtocol"], Shell], done: defer.Deferred,
                 stdin_fd: int | None = None, stderr=None):
        self.make_shell = make_shell
        self.done = done
        self.stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
        self._stderr = stderr
        # Someone types at a terminal: a prompt, and output that starts on a
        # clean line over it. Fed from a pipe, plain lines.
        self.interactive = _is_terminal(self.stdin_fd)
        self.shell = None
        self._secret: defer.Deferred | None = None
        self._saved_tty = None
        # Typed ahead, not consumed yet; a line too long to run is a LineTooLong in its place.
        self._lines: list = []
        self._busy = False            # a command (or start-up work) is running
        self._input_ended = False
        self._output_closed = False
        self._offline = False         # the client tried every server in vain
        self._skipping = False        # inside a line too long to run, until its end
        self._after_long = None       # input that followed a too-long line
        self._ended = False           # ``end``: no more lines run

    def run_first(self, work: Callable[[], defer.Deferred]):
        """Run start-up work (logging in) before the first typed command."""
        self._busy = True
        d = defer.maybeDeferred(work)
        d.addBoth(self._finished)

    def end(self):
        """End the program now, running none of the lines typed ahead (the start-up login failed)."""
        self._ended = True
        self._lines.clear()
        if self._output_closed:
            self.connectionLost()
        elif self.transport is not None and not self.transport.disconnecting:
            self.transport.loseConnection()

    def connectionMade(self):
        # The banner first: making the shell may ask for a password (``--user``),
        # and the banner's carriage return would start over that prompt's line.
        if self.interactive:
            self.write("Type 'help' for commands.")
        self.shell = self.make_shell(self)
        self._prompt()

    def write(self, text: str):
        if self.transport is None:
            return
        # Start on a clean line so pushed messages do not land after the prompt.
        start = "\r" if self.interactive else ""
        self.transport.write((start + text.replace("\n", os.linesep) + os.linesep).encode("utf-8", "replace"))
        if self.shell is not None and not self._busy and not self._lines and not self._input_ended:
            self._prompt()                # written over by what came while the prompt waited

    def note(self, text: str):
        """What is not an answer: with the answers at a terminal, on standard error from a pipe."""
        if self.interactive:
            self.write(text)
            return
        stream = self._stderr or sys.stderr
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass                          # nobody reads standard error: the answers go on

    def _end_secret_line(self):
        """After a password typed without echo, the terminal's cursor to the next line."""
        if self.interactive:
            self.transport.write(os.linesep.encode())

    def _prompt(self):
        if (self.interactive and self.transport is not None and self._secret is None and not self._busy
                and not self.transport.disconnecting):
            self.transport.write(self.shell.prompt.encode("utf-8", "replace"))

    def ask_secret(self, prompt: str) -> defer.Deferred:
        if self.interactive:
            self.transport.write(prompt.encode("utf-8", "replace"))
        else:
            self.note(prompt.rstrip())
        if self._lines:  # typed ahead already
            self._end_secret_line()
            line = self._lines.pop(0)
            return defer.fail(line) if isinstance(line, LineTooLong) else defer.succeed(line)
        if self._input_ended:
            self._end_secret_line()
            return defer.fail(EOFError("input closed"))
        self._echo(False)
        self._secret = defer.Deferred()
        return self._secret

    def _echo(self, on: bool):
        try:
            import termios
            if not os.isatty(self.stdin_fd):
                return
            if not on:
                self._saved_tty = termios.tcgetattr(self.stdin_fd)
                quiet = termios.tcgetattr(self.stdin_fd)
                quiet[3] &= ~termios.ECHO
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, quiet)
            elif self._saved_tty is not None:
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved_tty)
                self._saved_tty = None
        except (ImportError, OSError, ValueError):
            pass

    def dataReceived(self, data: bytes):
        """Lines as LineReceiver splits them, except that a line too long is skipped, not fatal."""
        while data:
            if self._skipping:
                end = data.find(self.delimiter)
                if end < 0:
                    return
                data, self._skipping = data[end + len(self.delimiter):], False
            super().dataReceived(data)
            data, self._after_long = self._after_long, None

    def lineLengthExceeded(self, rest: bytes):
        """Go on with the next line (LineReceiver would close the input); the
        error is said in the line's turn, after what the lines before it print."""
        self._lines.append(LineTooLong(self.MAX_LENGTH))
        self._skipping = True
        self._after_long = rest
        self._pump()

    def lineReceived(self, line: bytes):
        self._lines.append(line.decode("utf-8", "replace").rstrip("\r"))
        self._pump()

    def _pump(self):
        """Hand typed-ahead lines out in order: to a password prompt first, else as the next command."""
        if self._ended:
            self._lines.clear()
            return
        while self._lines:
            if self._secret is not None:
                line = self._lines.pop(0)
                d, self._secret = self._secret, None
                self._echo(True)
                self._end_secret_line()
                d.errback(line) if isinstance(line, LineTooLong) else d.callback(line)
            elif not self._busy:
                line = self._lines.pop(0)
                self._busy = True
                if isinstance(line, LineTooLong):
                    self.shell.fail(f"Error: {line}")
                    d = defer.succeed(None)
                else:
                    d = self.shell.handle(line)
                d.addBoth(self._finished)
            else:
                return

    def _finished(self, _):
        self._busy = False
        if not self._lines and not self._input_ended:
            self._prompt()
        self._pump()
        self._end_if_input_done()

    def readConnectionLost(self):
        """End of input: run what is left of it, then end as ``quit`` would."""
        last = self.clearLineBuffer()     # a last line with no newline still counts
        self._input_ended = True
        if last.strip():
            self.lineReceived(last)
        if self._secret is not None:      # a password prompt that will never be answered
            d, self._secret = self._secret, None
            self._echo(True)
            self._end_secret_line()
            d.errback(EOFError("input closed"))
        self._end_if_input_done()

    def writeConnectionLost(self):
        """stdout was closed (a pager quit): go on until input ends, showing nothing."""
        self._output_closed = True
        self._end_if_input_done()

    def offline(self, is_offline: bool):
        """The client reached no server after trying them all (True), or reached one again."""
        self._offline = is_offline
        self._end_if_input_done()

    def _end_if_input_done(self):
        if not self._input_ended:
            return
        if self._offline and (self._busy or self._lines):
            self._lines.clear()
            self.shell.fail("No server is reachable: the rest of the input is not run.")
        elif self._busy or self._lines or self._secret is not None:
            return
        if self._output_closed:
            self.connectionLost()         # nothing left to flush, and no transport to say so
        elif self.transport is not None and not self.transport.disconnecting:
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self._echo(True)
        if self._secret is not None:
            d, self._secret = self._secret, None
            d.errback(EOFError("input closed"))
        if not self.done.called:
            self.done.callback(self.exit_status)

    @property
    def exit_status(self) -> int:
        """1 once a line failed or the rest of the input was given up (``Shell.failed``), else 0."""
        return 1 if self.shell is not None and self.shell.failed else 0


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except (OSError, ValueError):
        return False
