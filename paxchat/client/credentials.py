"""Where the command-line client gets a password, and where it keeps a session.

A password comes from ``PAXCHAT_PASSWORD`` (for scripts) or is asked for
without echo; it is never written anywhere. A session token from ``login``
may be kept in ``~/.config/paxchat/session-<user>`` (mode 0600, in a 0700
directory) so that one-shot commands do not log in every time.
"""

from __future__ import annotations

import getpass as _getpass
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping

__all__ = ["PASSWORD_ENV", "NoPassword", "SessionCache", "ask_without_echo", "get_password"]

PASSWORD_ENV = "PAXCHAT_PASSWORD"


class NoPassword(Exception):
    """No password in the environment and no terminal to ask on (or the user gave up).

    ``no_terminal``: there was nothing to ask on, so the way out is to set
    PAXCHAT_PASSWORD or run in a terminal; else the person at the terminal
    gave up (Ctrl-C, an empty password, passwords that kept differing).
    """

    def __init__(self, message: str, no_terminal: bool = False):
        super().__init__(message)
        self.no_terminal = no_terminal


# A new password typed twice that differs is asked again this many times in all.
CONFIRM_TRIES = 3


TERMINAL = "/dev/tty"


def ask_without_echo(prompt: str) -> str:
    """``getpass`` where there is a terminal to ask on; EOFError where there is none.

    Without a terminal, getpass warns ("GetPassWarning: Can not control echo
    on the terminal", "Password input may be echoed") and reads standard
    input; those lines land before the CLI's own one-line error, which says
    what to do instead (set PAXCHAT_PASSWORD).
    """
    if os.name == "posix":
        try:
            with open(TERMINAL, "rb"):
                pass
        except OSError:
            raise EOFError("no terminal") from None
    with warnings.catch_warnings():  # a terminal whose echo cannot be turned off
        warnings.simplefilter("ignore", _getpass.GetPassWarning)
        return _getpass.getpass(prompt)


def get_password(prompt: str = "Password: ", confirm: bool = False,
                 env: Mapping[str, str] = os.environ,
                 ask: Callable[[str], str] = ask_without_echo,
                 check: Callable[[str], object] | None = None) -> str:
    """The password from PAXCHAT_PASSWORD, else asked for (twice if ``confirm``,
    and again, up to CONFIRM_TRIES times, while the two differ). A typed
    password that ``check`` refuses (ValueError) is asked for again at once,
    saying why, rather than repeated and then refused by the server."""
    if env.get(PASSWORD_ENV):
        return env[PASSWORD_ENV]
    why, differ = "", "The two passwords differ"
    try:
        for attempt in range(CONFIRM_TRIES if confirm else 1):
            password = ask(f"{why}; try again.\n{prompt}" if why else prompt)
            if not password:
                raise NoPassword("no password given")
            try:
                if check is not None:
                    check(password)
            except ValueError as e:
                why = str(e)
                continue
            if not confirm or ask("Repeat the password: ") == password:
                return password
            why = differ
    except EOFError:
        raise NoPassword("no password given", no_terminal=True) from None
    except KeyboardInterrupt:
        raise NoPassword("no password given") from None
    if why != differ:
        raise NoPassword(f"{why} (asked {CONFIRM_TRIES} times)")
    raise NoPassword(f"the two passwords differed {CONFIRM_TRIES} times")


def default_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "paxchat"


class SessionCache:
    """Session tokens by username, one private file each."""

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def _path(self, username: str) -> Path:
        return self.directory / f"session-{username}"

    def load(self, username: str) -> str | None:
        try:
            token = self._path(username).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return token or None

    def save(self, username: str, token: str) -> bool:
        """Keep the token; False (and nothing written) if the directory cannot be made private."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self._path(username)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, token.encode("utf-8"))
            finally:
                os.close(fd)
            return True
        except OSError:
            return False

    def forget(self, username: str) -> None:
        try:
            self._path(username).unlink()
        except OSError:
            pass
