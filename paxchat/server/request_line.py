"""Reading one request line: JSON, one object, nothing ambiguous in it.

Python's JSON parser accepts more than a request should be: ``NaN`` and
``Infinity``, an object that gives a key twice (the last would win unseen),
an integer longer than Python converts to ``int`` (a ``ValueError`` like a
syntax error). Each is refused here with an error that says which, and
nothing of such a line runs (docs/protocol.md).
"""

import json
import sys

from .errors import INVALID_REQUEST, ProtocolError

__all__ = ["RequestError", "decode_request", "valid_id"]


class _NotJSON(ValueError):
    """A constant that is not JSON (``NaN``, ``Infinity``), which Python's parser allows."""


def _reject_constant(name):
    raise _NotJSON(f"{name} is not JSON")


class _RepeatedKey(Exception):
    """An object of the line holds a key more than once."""


def _unique_keys(pairs):
    """The ``object_pairs_hook`` that refuses an object with a key twice (JSON lets it
    through, and the last would win unseen)."""
    made = dict(pairs)
    if len(made) != len(pairs):
        raise _RepeatedKey()
    return made


# Built once: ``json.loads`` with an option builds a decoder on every call.
_json_decode = json.JSONDecoder(parse_constant=_reject_constant).decode
_json_decode_unique = json.JSONDecoder(parse_constant=_reject_constant,
                                       object_pairs_hook=_unique_keys).decode

# Lines longer than this are parsed with ``_unique_keys`` at once: its cost
# (~0.5 us for a request of a few keys) is then less than counting their
# ":" (~0.4 ns a byte), which spares it to most shorter ones.
_CHECKED_WHILE_PARSED_FROM = 1024

# What the error of an over-long or repeated key says of it at most.
_KEY_CHARS_SHOWN = 64


class RequestError(ProtocolError):
    """A line that is JSON but not a request to run, whose ``id`` may still be echoed."""

    def __init__(self, code, message, request_id=None):
        super().__init__(code, message)
        self.request_id = request_id


def decode_request(line):
    """The request object of one line, or ProtocolError(invalid_request).

    Refused too, as ``RequestError`` echoing the id where the line has a
    usable one: an object that holds a key more than once (the request is
    ambiguous), and an integer longer than Python's int() converts (by
    default 4,300 digits).

    This runs for every request, so a short line is parsed without a
    look at its keys, then looked at only if it may repeat one.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_REQUEST, "a line must be UTF-8") from None
    try:
        if len(line) > _CHECKED_WHILE_PARSED_FROM:
            request = _json_decode_unique(text)
        else:
            request = _json_decode(text)
            if type(request) is dict:
                # Every key in the text is followed by a ":": with no ":" left
                # over, no key is repeated (nor any object nested), as in most
                # requests. A chat body's own ":" are the usual rest.
                colons = text.count(":") - len(request)
                if colons and not _all_in_the_body(colons, text, request):
                    _json_decode_unique(text)
    except _RepeatedKey:
        raise _repeated_key(text) from None
    except RecursionError:
        raise ProtocolError(INVALID_REQUEST, "a line must be one JSON object") from None
    except ValueError as e:
        if isinstance(e, (json.JSONDecodeError, _NotJSON)):
            raise ProtocolError(INVALID_REQUEST, "a line must be one JSON object") from None
        # Only int() fails otherwise: over sys.get_int_max_str_digits() digits.
        raise _too_long_number(text) from None
    if type(request) is not dict:
        raise ProtocolError(INVALID_REQUEST, "a request must be a JSON object")
    return request


def _all_in_the_body(colons, text, request):
    """Whether the ``colons`` ":" of ``text`` besides one after each key of
    ``request`` are those of its body: then no key is repeated.

    The others would be one after each key of a nested object or repeated,
    and those inside strings: the body's among them, as many as it holds
    unless ``\\u003a`` spells one.
    """
    body = request.get("body")
    return type(body) is str and body.count(":") == colons and "\\u003" not in text


class _KeysSeen:
    """An ``object_pairs_hook`` that notes the keys objects repeat.

    The outermost object is built last, so ``outer`` ends up as its own.
    """

    def __init__(self):
        self.repeated = None   # the first key found twice, in any object
        self.outer = ()

    def __call__(self, pairs):
        made = dict(pairs)
        if len(made) == len(pairs):
            self.outer = ()
            return made
        seen = set()
        self.outer = [key for key, _ in pairs if key in seen or seen.add(key)]
        if self.repeated is None:
            self.repeated = self.outer[0]
        return made


def _repeated_key(text):
    """The error for a line with a key twice in one object: which key, and the id
    unless that is the key repeated."""
    keys = _KeysSeen()
    try:
        request = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=keys).decode(text)
    except ValueError as e:   # what comes after the object that repeats a key (a long line)
        if isinstance(e, (json.JSONDecodeError, _NotJSON)):
            return ProtocolError(INVALID_REQUEST, "a line must be one JSON object")
        return _too_long_number(text)
    except RecursionError:
        return ProtocolError(INVALID_REQUEST, "a line must be one JSON object")
    request_id = request.get("id") if type(request) is dict else None
    if "id" in keys.outer or not valid_id(request_id):
        request_id = None
    return RequestError(INVALID_REQUEST, f"the key {_shown(keys.repeated)} appears more than once"
                        " in one object: which value is meant is unclear", request_id)


def _shown(key):
    shown = repr(key)
    return shown if len(shown) <= _KEY_CHARS_SHOWN else shown[:_KEY_CHARS_SHOWN] + "..."


_TOO_LONG = object()   # stands for a number int() refused, in the second reading


def _int_or_too_long(digits):
    try:
        return int(digits)
    except ValueError:
        return _TOO_LONG


def _too_long_number(text):
    """The error for a line with an integer longer than int() converts, saying where it is."""
    try:
        request = json.JSONDecoder(parse_constant=_reject_constant,
                                   parse_int=_int_or_too_long).decode(text)
    except (ValueError, RecursionError):
        return ProtocolError(INVALID_REQUEST, "a line must be one JSON object")
    if type(request) is not dict:
        return ProtocolError(INVALID_REQUEST, "a request must be a JSON object")
    too_long = f"more than {sys.get_int_max_str_digits()} digits"
    request_id = request.get("id")
    if request_id is _TOO_LONG:
        return ProtocolError(INVALID_REQUEST, f"the \"id\" is a number of {too_long}")
    if not valid_id(request_id):
        request_id = None
    try:
        key = next((key for key, value in request.items() if _holds_too_long(value)), None)
    except RecursionError:
        key = None
    if key is None:
        message = f"a number in the request has {too_long}"
    elif request[key] is _TOO_LONG:
        message = f"{_shown(key)} is a number of {too_long}"
    else:
        message = f"{_shown(key)} holds a number of {too_long}"
    return RequestError(INVALID_REQUEST, message, request_id)


def _holds_too_long(value):
    if value is _TOO_LONG:
        return True
    if type(value) is list:
        return any(map(_holds_too_long, value))
    if type(value) is dict:
        return any(map(_holds_too_long, value.values()))
    return False


def valid_id(value):
    return type(value) in (int, str)
