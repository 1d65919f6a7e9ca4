"""Turning applied commands into events for this node's connections.

The factory adds an ``EventPusher`` as an observer of the command log. Every
node applies every command, so each node pushes to the connections it holds
and together they reach every connection of a user, wherever it is attached:
a message to its recipient, what one session of an account did (sent,
read, deleted, its settings) to the account's other sessions, that a message was read
to its sender, and a deleted message to its other party (a deleted
account's messages to their senders).
Pushing only queues bytes on a transport; a connection that does not read
is dealt with by the protocol's output bound, never here.

``LeaderEvents`` pushes something else: who this node believes leads, to
the connections that asked for it in their ``hello``.
"""

from paxchat.limits import MAX_LIMIT

# The connections that follow the leader are told this long after the node's
# view changes, the view at that time: an election (null, then the new
# leader, within a few milliseconds when the network is good) comes as one
# event, and a node whose elections flap tells each connection ten times a
# second at most.
LEADER_EVENT_DELAY = 0.1

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
            self._elsewhere(command, op, response)
        elif op == "logout":
            self._end(self._registry.of_session(command["session"]), command, "logged_out")
        elif op == "delete_account":
            self._end(self._registry.of_user(command["username"]), command, "account_deleted")
            effect = response.get("effect", {})
            self._to_others("deleted", effect.get("others"), effect.get("unread"))
        elif op == "set_settings":
            # Every device shows the setting as it is (a resend tells them again: harmless).
            self._send(self._other_sessions(command["username"], command["session"]),
                       {"event": "settings", "settings": response["result"]})

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
            self._send(conns, {"event": kind, "message": message})

    def _elsewhere(self, command, op, response):
        """Messages one session read or deleted, told to the account's other sessions.

        So every device shows the same unread badges and the same
        conversation. The ids are those the command read, marked or
        deleted (the apply's ``effect``; a resent write has none, so it
        tells no one again). The sender of a message read hears ``seen``;
        a deleted message goes from its other party's connections too:
        deleting removes it for both.
        """
        effect = response.get("effect")
        if effect is None:
            return                   # nothing was read, marked or deleted
        kind = _ELSEWHERE[op]
        user = command["username"]
        self._send(self._other_sessions(user, command["session"]),
                   _ids_event(kind, effect["ids"], effect.get("unread", {}).get(user)))
        self._to_others("seen", effect.get("senders"))
        self._to_others(kind, effect.get("others"), effect.get("unread"))

    def _to_others(self, kind, ids_by_user, unread=None):
        """Each account named, the event for its own ids: at most ``MAX_LIMIT``
        an event, as a request names (a deleted account's senders may have
        sent it any number); with its unread count when the effect has it."""
        for other, ids in (ids_by_user or {}).items():
            conns = self._registry.of_user(other)
            for start in range(0, len(ids), MAX_LIMIT) if conns else ():
                self._send(conns, _ids_event(kind, ids[start:start + MAX_LIMIT], (unread or {}).get(other)))

    @staticmethod
    def _send(conns, event):
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


def _ids_event(kind, ids, unread):
    """``read``, ``seen`` or ``deleted`` of ``ids``; a ``deleted`` one also says
    how many messages its account has unread after it."""
    event = {"event": kind, "ids": ids}
    if unread is not None:
        event["unread"] = unread
    return event


class LeaderEvents:
    """``{"event": "leader", "leader": N or null}`` to each connection that asked
    (``hello`` with ``leader_events``), whenever what ``hello`` would answer it changes.

    A client that keeps its leader shown (the desktop app's status bar) no
    longer asks ``hello`` every few seconds, and hears of a leader that died
    as soon as its node does. The log's leader observer (``changed``) only
    starts a timer; once ``delay`` is over, the leader is read again and told
    to each connection that was last told (by ``hello``'s answer or an event)
    something else. So flapping elections come as their latest value, and a
    connection never hears the same leader twice in a row.

    @param leader_id: what ``hello`` answers: the log's ``leader_id``.
    """

    def __init__(self, reactor, leader_id, delay=LEADER_EVENT_DELAY):
        self._reactor = reactor
        self._leader_id = leader_id
        self._delay = delay
        # conn -> the leader it was last told. Kept here, not on the connection:
        # one more attribute there costs every connection ~1.5 KiB (handlers.py).
        self._told = {}
        self._call = None

    def __contains__(self, conn):
        return conn in self._told

    def __len__(self):
        return len(self._told)

    def follow(self, conn, leader):
        """``conn`` asked for leader events; its ``hello`` answered ``leader``."""
        self._told[conn] = leader

    def forget(self, conn):
        """``conn`` asked for no more, or closed. With no follower left, the
        timer waiting to tell them goes too: a stopping node closes every
        connection, often just after its hand-over changed the leader."""
        self._told.pop(conn, None)
        call = self._call
        if call is not None and not self._told:
            self._call = None
            if call.active():
                call.cancel()

    def changed(self, leader=None):
        """The log's leader observer: tell the followers once the delay is over."""
        if self._told and self._call is None:
            self._call = self._reactor.callLater(self._delay, self._tell)

    def _tell(self):
        self._call = None
        leader = self._leader_id()
        event = {"event": "leader", "leader": leader}
        told = self._told
        for conn, before in list(told.items()):
            if before != leader and conn.connected:
                told[conn] = leader
                conn.send_event(event)
