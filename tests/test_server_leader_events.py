"""``leader`` events: a connection that asked in ``hello`` is told who leads as that changes."""

from paxchat.locallog import LocalLog
from paxchat.server.push import LEADER_EVENT_DELAY

from .server_support import Server, test_settings

PW = "password-1"


class ElectingLog(LocalLog):
    """A LocalLog whose leader the test sets, telling leader observers as a ReplicatedLog does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.leader = 1
        self.leader_observers = []

    def add_leader_observer(self, observer):
        self.leader_observers.append(observer)

    def leader_id(self):
        return self.leader

    def elect(self, leader):
        if leader != self.leader:
            self.leader = leader
            for observer in self.leader_observers:
                observer(leader)


def server(**settings):
    s = Server(log_class=ElectingLog, settings=test_settings(**settings) if settings else None)
    return s, s.log


def leader_events(client):
    return [e for e in client.events() if e["event"] == "leader"]


def following(s):
    client = s.connect()
    answer = client.ok("hello", leader_events=True)
    assert answer["leader"] == s.log.leader_id() and answer["leader_events"] is True
    return client


def test_a_connection_that_did_not_ask_hears_nothing_and_hello_answers_as_before():
    s, log = server()
    client = s.connect()
    answer = client.ok("hello")
    assert answer == {"node": 1, "leader": 1, "protocol": 1,
                      "nodes": [{"id": 1, "client": "127.0.0.1:7101"}, {"id": 2, "client": "127.0.0.1:7102"}]}
    following(s)
    log.elect(None)
    s.clock.advance(1)
    log.elect(2)
    s.clock.advance(1)
    assert client.events() == []


def test_a_follower_hears_each_change_after_the_delay_not_at_opt_in():
    s, log = server()
    client = following(s)
    s.clock.advance(10)
    assert client.events() == []              # hello's answer named the leader already
    log.elect(None)                           # the node starts an election
    s.clock.advance(LEADER_EVENT_DELAY * 0.9)
    assert client.events() == []
    s.clock.advance(LEADER_EVENT_DELAY * 0.2)
    assert leader_events(client) == [{"event": "leader", "leader": None}]
    s.clock.advance(1)
    log.elect(3)
    s.clock.advance(LEADER_EVENT_DELAY)
    assert leader_events(client)[1:] == [{"event": "leader", "leader": 3}]
    assert not s.clock.getDelayedCalls()


def test_a_flapping_election_comes_as_its_latest_value_and_a_return_as_nothing():
    s, log = server()
    client = following(s)
    for leader in (None, 2, None, 3, None, 3):
        log.elect(leader)
        s.clock.advance(LEADER_EVENT_DELAY / 10)
    s.clock.advance(LEADER_EVENT_DELAY)
    assert leader_events(client) == [{"event": "leader", "leader": 3}]
    # Gone and back within the delay: what the client was told still holds.
    log.elect(None)
    log.elect(3)
    s.clock.advance(1)
    assert len(leader_events(client)) == 1
    # Flapping for ever: told ten times a second at most, each time a change.
    for step in range(100):
        log.elect(None if step % 2 else 4 + step % 4)
        s.clock.advance(LEADER_EVENT_DELAY / 4)
    told = [e["leader"] for e in leader_events(client)]
    assert 2 <= len(told) <= 1 + 100 / 4
    assert all(a != b for a, b in zip(told, told[1:]))
    s.clock.advance(1)
    assert leader_events(client)[-1]["leader"] == log.leader_id()


def test_each_connection_is_told_what_it_does_not_know_yet():
    s, log = server()
    early = following(s)
    log.elect(None)
    s.clock.advance(LEADER_EVENT_DELAY / 2)
    late = s.connect()
    assert late.ok("hello", leader_events=True)["leader"] is None
    s.clock.advance(LEADER_EVENT_DELAY)
    assert leader_events(early) == [{"event": "leader", "leader": None}]
    assert leader_events(late) == []          # its hello said so already


def test_logged_in_connections_and_others_alike():
    s, log = server()
    alice = s.connect()
    alice.ok("create_account", username="alice", password=PW)
    alice.ok("login", username="alice", password=PW)
    alice.ok("hello", leader_events=True)
    stranger = following(s)
    log.elect(2)
    s.clock.advance(LEADER_EVENT_DELAY)
    assert leader_events(alice) == leader_events(stranger) == [{"event": "leader", "leader": 2}]
    # Logging out changes nothing to it.
    alice.ok("logout")
    log.elect(1)
    s.clock.advance(LEADER_EVENT_DELAY)
    assert leader_events(alice)[-1] == {"event": "leader", "leader": 1}


def test_a_wrong_type_is_refused_and_changes_nothing():
    s, log = server()
    client = s.connect()
    for bad in ("yes", 1, 0, [True], {"on": True}):
        assert client.error("hello", leader_events=bad) == "invalid_request"
    assert "must be true or false" in client.inbox[-1]["error"]["message"]
    assert len(s.factory.leader_events) == 0
    log.elect(2)
    s.clock.advance(1)
    assert client.events() == []
    follower = following(s)
    assert follower.error("hello", leader_events="no") == "invalid_request"
    log.elect(3)
    s.clock.advance(1)
    assert leader_events(follower) == [{"event": "leader", "leader": 3}]   # still following


def test_null_or_absent_leaves_it_as_it_was_and_false_stops_it():
    s, log = server()
    client = following(s)
    assert "leader_events" not in client.ok("hello")
    assert "leader_events" not in client.ok("hello", leader_events=None)
    log.elect(2)
    s.clock.advance(1)
    assert len(leader_events(client)) == 1
    assert client.ok("hello", leader_events=False)["leader_events"] is False
    log.elect(3)
    s.clock.advance(1)
    assert len(leader_events(client)) == 1
    # Asked again: told from what this hello answers.
    assert client.ok("hello", leader_events=True)["leader"] == 3
    log.elect(None)
    s.clock.advance(1)
    assert leader_events(client)[-1] == {"event": "leader", "leader": None}


def test_a_closed_connection_is_forgotten():
    s, log = server()
    client = following(s)
    assert len(s.factory.leader_events) == 1
    client.proto.connectionLost(None)
    assert len(s.factory.leader_events) == 0
    log.elect(2)
    s.clock.advance(1)
    assert not s.clock.getDelayedCalls()     # nobody to tell: no timer


def test_no_timer_outlives_the_last_follower():
    """A stopping node closes every connection (often within the delay, after its
    hand-over changed the leader): nothing is left waiting to tell no one."""
    s, log = server()
    client, other = following(s), following(s)
    log.elect(2)
    assert len(s.clock.getDelayedCalls()) == 1
    client.proto.connectionLost(None)
    assert len(s.clock.getDelayedCalls()) == 1          # another still follows
    other.proto.connectionLost(None)
    assert not s.clock.getDelayedCalls()


def test_a_follower_that_does_not_read_is_dropped_as_for_any_event_and_the_others_are_told():
    s, log = server(max_output_backlog=40, max_output_burst=80)
    stuck, reader = following(s), following(s)
    stuck.transport.producer.pauseProducing()   # its transport's buffer is full
    for leader in (2, None, 3, None):
        stuck.transport.producer.pauseProducing()
        log.elect(leader)
        s.clock.advance(LEADER_EVENT_DELAY)
    assert stuck.transport.disconnected          # aborted past max_output_burst, not kept
    assert [e["leader"] for e in leader_events(reader)] == [2, None, 3, None]
    stuck.proto.connectionLost(None)
    assert len(s.factory.leader_events) == 1
    assert s.factory.output_debt.bytes == 0


def test_a_lone_node_never_tells_a_change():
    s = Server()                                 # LocalLog: it always leads
    client = s.connect()
    assert client.ok("hello", leader_events=True) == {
        "node": 1, "leader": 1, "protocol": 1, "leader_events": True,
        "nodes": [{"id": 1, "client": "127.0.0.1:7101"}, {"id": 2, "client": "127.0.0.1:7102"}]}
    s.clock.advance(60)
    assert client.events() == []
