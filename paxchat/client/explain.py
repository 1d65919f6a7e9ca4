"""Readable sentences for every way a client call can fail.

The CLI and the desktop app both show failures to people, never
tracebacks: each protocol error code gets a sentence that says what happened
and, where there is one, what to do about it.
"""

from __future__ import annotations

from twisted.internet import error as net_error
from twisted.python.failure import Failure

from paxchat.limits import MAX_BODY_CHARS, MAX_LINE_BYTES

from .errors import (
    ClientError, ClosedUnanswered, ConnectionDropped, NoMajority, ServerError, Unreachable, UntrustedNodes,
)

__all__ = ["ERROR_SENTENCES", "explain"]

ERROR_SENTENCES = {
    "invalid_username": "That username is not allowed: use 1 to 32 letters, digits, '_', '.' or '-'.",
    "invalid_password": "That password is not allowed: use 8 to 1,024 bytes.",
    "username_taken": "That username is already taken; pick another one.",
    "bad_credentials": "The username or password is wrong.",
    "bad_session": "Your session has ended; please log in again.",
    "no_such_user": "There is no account with that name.",
    "body_too_large": f"That message is too long (at most {MAX_BODY_CHARS:,} characters).",
    "invalid_request": "The server did not understand the request.",
    "unknown_op": "The server does not support this operation.",
    "not_logged_in": "You need to log in first.",
    "unavailable": "The cluster could not commit this in time (too few servers reachable). Try again shortly.",
    "rate_limited": "Too many requests; wait a moment and try again.",
    "frame_too_large": f"The request was too large for the server (at most {MAX_LINE_BYTES:,} bytes once encoded).",
    "internal": "The server hit an internal error; try again.",
    "upgrade_in_progress": ("Not every server of the cluster has been upgraded to a version with"
                            " settings yet; try again once the upgrade is done."),
}


def explain(reason) -> str:
    """One sentence for a Failure or exception from the client library (or the network)."""
    exc = reason.value if isinstance(reason, Failure) else reason
    if isinstance(exc, ServerError):
        sentence = ERROR_SENTENCES.get(exc.code)
        if sentence is None:
            return f"The server refused: {exc.message}"
        if exc.code in ("invalid_request", "internal") and exc.message not in ("", exc.code):
            return f"{sentence} ({exc.message})"
        return sentence
    if isinstance(exc, UntrustedNodes):
        advice = f" To fix it: {exc.advice}." if exc.advice else ""
        return f"TLS refused the paxchat servers' certificates: {exc.summary()}.{advice}"
    if isinstance(exc, NoMajority):
        return ("Some servers answer, but too few of them are up to agree on anything (no majority)."
                " Try again once more of them are back.")
    if isinstance(exc, Unreachable):
        tried = str(exc).partition(": ")[2]
        where = f" (tried {tried})" if tried else ""
        if isinstance(exc, ClosedUnanswered):
            return (f"Cannot reach any paxchat server{where}: they accept the connection but"
                    " answer nothing. client_tls in this client's cluster.ini may not be what"
                    " the cluster uses (a node speaking TLS closes a plain connection so;"
                    " client_tls = on also needs the cluster's ca.pem), or the servers are"
                    " turning away connections from this address.")
        return f"Cannot reach any paxchat server{where}. Check that the cluster is running."
    if isinstance(exc, ConnectionDropped):
        return "The connection to the server was lost."
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "The server refused the connection (is it running?)."
    if isinstance(exc, (net_error.TimeoutError, net_error.ConnectingCancelledError)):
        return "Connecting to the server timed out."
    if isinstance(exc, ClientError):
        return str(exc) or exc.__class__.__name__
    text = str(exc).strip()
    return f"Unexpected error: {text}" if text else f"Unexpected error ({exc.__class__.__name__})."
