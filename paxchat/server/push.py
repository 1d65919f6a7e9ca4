"""Turning applied commands into events for this node's connections.

The factory adds an ``EventPusher`` as an observer of the command log. Every
node applies every command, so each node pushes to the connections it holds
and together they reach every connection of a user, wherever it is attached.
Pushing only queues bytes on a transport; a connection that does not read
is dealt with by the protocol's output bound, never here.
"""

from twisted.logger import Logger

log = Logger()


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
        elif op == "logout":
            self._end(self._registry.of_session(command["session"]), command, "logged_out")
        elif op == "delete_account":
            self._end(self._registry.of_user(command["username"]), command, "account_deleted")

    def _message(self, command, result):
        message_id = result["message_id"]
        if message_id <= self._last_message_id:
            return
        self._last_message_id = message_id
        conns = self._registry.of_user(command["to"])
        if not conns:
            return                   # most messages, on most nodes
        event = {"event": "message", "message": {
            "id": message_id, "from": command["from"], "to": command["to"],
            "body": command["body"], "ts": result["ts"], "read": False,
        }}
        for conn in conns:
            conn.send_event(event)

    def _end(self, conns, command, reason):
        for conn in conns:
            self._registry.detach(conn)
            # The connection that asked for it hears it in its answer.
            if conn.ending_session != command.get("session"):
                conn.send_event({"event": "session_ended", "reason": reason})
