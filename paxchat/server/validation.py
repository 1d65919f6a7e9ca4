"""Checking request arguments against the contract before anything happens.

Every function takes the decoded request object and returns the argument in
its checked form or raises ``ProtocolError``. A value of the wrong JSON type
is ``invalid_request``; a well-typed value that breaks an op's own rule gets
that op's code (``invalid_username``, ``body_too_large``, ...). ``bool`` is
never accepted where an int is expected, and ints stay within SQLite's
64-bit range. An optional argument given as JSON ``null`` takes its default.
"""

from paxchat.limits import MAX_BODY_CHARS, MAX_LIMIT, MAX_PASSWORD_BYTES, MIN_PASSWORD_BYTES, PATTERN, USERNAME

from .errors import INVALID_REQUEST, ProtocolError

MAX_USERNAME_CHARS = 32
MAX_IDS = 1000
MAX_MESSAGE_ID = 2**63 - 1
MAX_CLIENT_MSG_ID_CHARS = 128
MAX_SESSION_TOKEN_CHARS = 256

_MISSING = object()


def invalid(message):
    return ProtocolError(INVALID_REQUEST, message)


def _get(request, name, default):
    value = request.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise invalid(f"missing argument {name!r}")
        return default
    return value


def is_int(value):
    return type(value) is int


def is_text(value):
    """A str that is valid Unicode (JSON lets lone surrogates through)."""
    if type(value) is not str:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def any_string(request, name, default=_MISSING):
    """A str argument, valid Unicode or not: for those a bad one is simply not found."""
    value = _get(request, name, default)
    if type(value) is not str:
        raise invalid(f"{name!r} must be a string")
    return value


def string(request, name, default=_MISSING, max_chars=None):
    value = any_string(request, name, default)
    if not is_text(value):
        raise invalid(f"{name!r} is not valid Unicode (it holds a lone surrogate)")
    if max_chars is not None and len(value) > max_chars:
        raise invalid(f"{name!r} is longer than {max_chars} characters")
    return value


def optional_string(request, name, max_chars):
    if request.get(name) is None:
        return None
    return string(request, name, max_chars=max_chars)


def client_msg_id(request):
    """The optional key a client gives a write so a resend of it is applied once."""
    return optional_string(request, "client_msg_id", MAX_CLIENT_MSG_ID_CHARS)


def integer(request, name, low, high, default=_MISSING):
    value = _get(request, name, default)
    if not is_int(value):
        raise invalid(f"{name!r} must be an integer")
    if not low <= value <= high:
        raise invalid(f"{name!r} must be between {low} and {high}")
    return value


def boolean(request, name):
    value = _get(request, name, _MISSING)
    if type(value) is not bool:
        raise invalid(f"{name!r} must be true or false")
    return value


def optional_boolean(request, name):
    """True, False, or None when absent or null (the caller keeps what it had)."""
    if request.get(name) is None:
        return None
    return boolean(request, name)


def optional_integer(request, name, low, high):
    if request.get(name) is None:
        return None
    return integer(request, name, low, high)


def limit(request, default):
    return integer(request, "limit", 1, MAX_LIMIT, default)


def message_ids(request, name="ids"):
    value = _get(request, name, _MISSING)
    if type(value) is not list:
        raise invalid(f"{name!r} must be a list of message ids")
    if len(value) > MAX_IDS:
        raise invalid(f"{name!r} holds more than {MAX_IDS} ids")
    for item in value:
        if not is_int(item) or not 0 <= item <= MAX_MESSAGE_ID:
            raise invalid(f"{name!r} must hold only message ids (integers from 0)")
    return list(dict.fromkeys(value))


def is_username(value):
    return type(value) is str and USERNAME.fullmatch(value) is not None


def username(request, name, code):
    """A username argument; a string that cannot be a username raises ``code``."""
    value = any_string(request, name)
    if not is_username(value):
        raise ProtocolError(code, f"{name!r} is not a username: 1 to 32 of A-Z a-z 0-9 _ . -")
    return value


def password(request, name, code):
    """A password as bytes; a string outside 8..1024 UTF-8 bytes raises ``code``."""
    value = _get(request, name, _MISSING)
    if type(value) is not str:
        raise invalid(f"{name!r} must be a string")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(code, f"{name!r} is not valid Unicode") from None
    if not MIN_PASSWORD_BYTES <= len(data) <= MAX_PASSWORD_BYTES:
        raise ProtocolError(
            code, f"{name!r} must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes of UTF-8")
    return data


def glob_pattern(request):
    value = string(request, "pattern", "*", max_chars=64)
    if not PATTERN.fullmatch(value):
        raise invalid("'pattern' is 1 to 64 of A-Z a-z 0-9 _ . - and the wildcards * ?")
    return value
