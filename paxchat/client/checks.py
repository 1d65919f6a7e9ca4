"""Arguments the CLI checks itself, against the protocol's limits.

A typo such as ``list 'al%'`` or ``read 100000`` would otherwise reach the
server and come back as "the server did not understand the request"; here
it gets a sentence saying what is allowed. Each check returns the value or
raises ``ValueError`` with that sentence.
"""

from __future__ import annotations

from paxchat.limits import MAX_LIMIT, MAX_PASSWORD_BYTES, MIN_PASSWORD_BYTES, PATTERN, USERNAME

__all__ = ["check_body", "check_limit", "check_password", "check_pattern", "check_username"]


def check_limit(text) -> int:
    """A count of messages or names: a whole number from 1 to MAX_LIMIT."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"{text!r} is not from 1 to {MAX_LIMIT:,}")
    return value


def check_pattern(text: str) -> str:
    """A name pattern: 1 to 64 of A-Z a-z 0-9 _ . - and the wildcards * ?."""
    if not PATTERN.fullmatch(text):
        raise ValueError(f"{text!r} is not a pattern: use 1 to 64 of A-Z a-z 0-9 _ . - * ?")
    return text


def check_username(text: str) -> str:
    """A name for a new account, checked before its password is asked for."""
    if not USERNAME.fullmatch(text):
        raise ValueError(f"{text!r} is not a username: use 1 to 32 of A-Z a-z 0-9 _ . -")
    return text


def check_body(text: str) -> str:
    """A message with something to read: whitespace alone is refused, as the prompt and app do."""
    if not text.strip():
        raise ValueError("the message is empty")
    return text


def check_password(text: str) -> str:
    """A new password, checked before it is asked for again."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if not MIN_PASSWORD_BYTES <= size <= MAX_PASSWORD_BYTES:
        raise ValueError(f"That password is {size:,} bytes long;"
                         f" use {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES:,} bytes")
    return text
