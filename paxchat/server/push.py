"""Turning applied commands into events for this node's connections.

The factory adds an ``EventPusher`` as an observer of the command log. Every
node applies every command, so each node pushes to the connections it holds
and together they reach every connection of a user, wherever it is attached:
a message to its recipient, and what one session of an account did (sent,
read, deleted) to the account's other sessions.
Pushing only queues bytes on a transport; a connection that does not read
is dealt with by the protocol's output bound, never here.
"""

from twisted.logger import Logger

log = Logger()

# Ops whose effect the account's other sessions hear, and the event they hear.
_ELSEWHERE = {"mark_read": "read", "read_messages": "read", "delete_messages": "deleted"}


class EventPusher:
    def __init__(self, registry):
        self._registry = registry
        # Message ids grow with the log; a repeated send (same client_msg_id)
        # answers an older id and must not be pushed twice.
        self._last_message_id = 0

    def __call__(self, command, response):
        if not isinstance(response, dict) or response.get("ok") is not True:
            return
        op = command.get("op")
        if op == "send_message":
            self._message(command, response["result"])
        elif op in _ELSEWHERE:
            self._elsewhere(command, op, response["result"])
        elif op == "logout":
            self._end(self._registry.of_session(command["session"]), command, "logged_out")
        elif op == "delete_account":
            self._end(self._registry.of_user(command["username"]), command, "account_deleted")

    def _message(self, command, result):
        """``message`` to the recipient's connections; ``sent`` to the sender's other sessions.

        The connections of the session that sent it hear the answer
        instead. A message to oneself reaches every connection of the
        account as ``message`` already.
        """
        message_id = result["message_id"]
        if message_id <= self._last_message_id:
            return
        self._last_message_id = message_id
        sender, recipient = command["from"], command["to"]
        to_recipient = self._registry.of_user(recipient)
        elsewhere = [] if sender == recipient else self._other_sessions(sender, command["session"])
        if not to_recipient and not elsewhere:
            return                   # most messages, on most nodes
        message = {"id": message_id, "from": sender, "to": recipient,
                   "body": command["body"], "ts": result["ts"], "read": False}
        for conns, kind in ((to_recipient, "message"), (elsewhere, "sent")):
            if conns:
                event = {"event": kind, "message": message}
                for conn in conns:
                    conn.send_event(event)

    def _elsewhere(self, command, op, result):
        """Messages one session read or deleted, told to the account's other sessions.

        So every device shows the same unread badges and the same
        conversation. The ids are those the command named (or, for
        ``read_messages``, returned): a session ignores any it does not
        hold. Repeating an event (a retried write) changes nothing.
        """
        if op == "read_messages":
            ids = [message["id"] for message in result.get("messages", ())]
        elif result.get("marked") or result.get("deleted"):
            ids = list(dict.fromkeys(command["ids"]))
        else:
            return                   # nothing was marked or deleted
        if not ids:
            return
        conns = self._other_sessions(command["username"], command["session"])
        if conns:
            event = {"event": _ELSEWHERE[op], "ids": ids}
            for conn in conns:
                conn.send_event(event)

    def _other_sessions(self, username, session_hash):
        """``username``'s connections on this node but those of the session that did it."""
        return [conn for conn in self._registry.of_user(username)
                if conn.session is not None and conn.session.session_hash != session_hash]

    def _end(self, conns, command, reason):
        for conn in conns:
            self._registry.detach(conn)
            # The connection that asked for it hears it in its answer.
            if conn.ending_session != command.get("session"):
                conn.send_event({"event": "session_ended", "reason": reason})
