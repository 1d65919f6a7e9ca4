"""Logs: one line per event, text or JSON, and never a password, a session token or its hash."""

import hashlib
import io
import json

import pytest
import pytest_twisted
from twisted.application import service
from twisted.internet import defer
from twisted.logger import (ILogObserver, LogLevel, Logger, eventAsJSON, globalLogPublisher)
from twisted.python import usage
from twisted.python.failure import Failure

from paxchat import logs, tap
from paxchat.node import NodeService
from tests.cluster_support import HAS_REPLICATED_LOG, cluster_factory  # noqa: F401 (fixture)
from tests.ops_support import connect, reactor_, write_ops_config


def capture(fmt="text", level="info", journal=False, node=None):
    out = io.StringIO()
    observer = logs.make_observer(fmt, stream=out, level=level, journal=journal, node=node)
    return Logger(namespace="paxchat.test", observer=observer), out


def test_text_is_one_line_per_event():
    log, out = capture()
    log.info("peer {peer} says {what}", peer=3, what="two\nlines\r\x1b[31m")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("info [paxchat.test] peer 3 says two\\nlines\\r\\x1b[31m")
    assert lines[0][:4].isdigit() and "Z info" in lines[0]


def test_a_traceback_stays_on_one_line():
    log, out = capture()
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        log.failure("snapshot failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "critical [paxchat.test] snapshot failed: Traceback" in lines[0]
    assert "RuntimeError: disk on fire" in lines[0]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_lone_surrogate_is_written_as_its_escape_not_lost(fmt):
    """JSON lets a client spell a lone surrogate, which UTF-8 cannot carry: a line
    with one would fail the write, and Twisted would log the observer's failure
    instead of the line."""
    data = io.BytesIO()
    out = io.TextIOWrapper(data, encoding="utf-8", errors="strict", write_through=True)
    observer = logs.make_observer(fmt, stream=out, level="info", journal=False)
    Logger(namespace="paxchat.test", observer=observer).info("op {op} of caf\u00e9", op="x\ud800y")
    [line] = data.getvalue().decode("utf-8").splitlines()
    if fmt == "json":
        assert json.loads(line)["message"] == "op x\ud800y of caf\u00e9"  # \ud800 is JSON's escape too
    else:
        assert line.endswith("info [paxchat.test] op x\\ud800y of caf\u00e9")


def test_journal_lines_carry_the_priority_and_no_time():
    log, out = capture(journal=True)
    log.warn("slow fsync: {ms} ms", ms=250)
    log.error("refused")
    assert out.getvalue().splitlines() == [
        "<4>warn [paxchat.test] slow fsync: 250 ms", "<3>error [paxchat.test] refused"]


def test_json_is_one_object_per_line_with_only_named_fields():
    log, out = capture("json", node=2)
    log.info("node {node_id} leader is now {leader} via {address}", node_id=2, leader=3,
             address=object(), secret="not named, never written")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "info" and record["namespace"] == "paxchat.test"
    assert record["node"] == 2 and record["node_id"] == 2 and record["leader"] == 3
    assert record["message"].startswith("node 2 leader is now 3 via <object")
    assert isinstance(record["address"], str)
    assert "secret" not in record and "not named" not in lines[0]


def test_json_failure():
    log, out = capture("json")
    log.failure("apply failed", Failure(ValueError("bad\nthing")))
    record = json.loads(out.getvalue())
    assert out.getvalue().count("\n") == 1
    assert record["failure"]["type"] == "ValueError"
    assert record["failure"]["message"] == "bad\nthing"
    assert record["level"] == "critical"


@pytest.mark.parametrize("level", ["warn", "warning", " WARNING "])
def test_level_filter(level):
    log, out = capture(level=level)
    log.info("quiet")
    log.debug("quieter")
    log.warn("loud")
    assert [line.split(" ", 1)[1] for line in out.getvalue().splitlines()] == [
        "warn [paxchat.test] loud"]


def test_a_reconnecting_clients_retries_show_at_debug_only():
    """Twisted's ClientService schedules a retry per peer per backoff step
    while a node is down: at info that was most of a node's log."""
    from twisted.application.internet import ClientService
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactorClock
    shown = {}
    for level in ("info", "debug"):
        out = io.StringIO()
        observer = logs.make_observer("text", stream=out, level=level)
        globalLogPublisher.addObserver(observer)
        try:
            reactor = MemoryReactorClock()
            service = ClientService(TCP4ClientEndpoint(reactor, "127.0.0.1", 1), Factory(), clock=reactor)
            service.startService()
            # The connect is refused: a retry is scheduled, and said.
            reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            Logger(namespace="paxchat.test").info("our own")
            service.stopService()
        finally:
            globalLogPublisher.removeObserver(observer)
        shown[level] = out.getvalue()
    assert "our own" in shown["info"] and "Scheduling retry" not in shown["info"]
    assert "Scheduling retry" in shown["debug"]


def test_bad_format_or_level():
    with pytest.raises(logs.LogFormatError, match="text or json"):
        logs.make_observer("xml")
    with pytest.raises(logs.LogFormatError, match="debug, info"):
        logs.make_observer("text", level="loud")


def test_environment_chooses(monkeypatch):
    out = io.StringIO()
    observer = logs.observer_from_environment(
        {"PAXCHAT_LOG_FORMAT": "JSON", "PAXCHAT_LOG_LEVEL": "error"}, stream=out, node=1)
    Logger(namespace="x", observer=observer).info("dropped")
    Logger(namespace="x", observer=observer).error("kept")
    assert json.loads(out.getvalue())["message"] == "kept"


def test_journal_is_detected_from_journal_stream(tmp_path, monkeypatch):
    path = tmp_path / "out"
    with open(path, "w") as stream:
        import os
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        Logger(namespace="x", observer=logs.make_observer(stream=stream)).info("hi")
    assert path.read_text() == "<6>info [x] hi\n"
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    out = io.StringIO()
    Logger(namespace="x", observer=logs.make_observer(stream=out)).info("hi")
    assert not out.getvalue().startswith("<")


INI = "[cluster]\nclient_tls = off\n[node.1]\nclient = 127.0.0.1:7101\npeer = 127.0.0.1:7201\n"


def test_tap_option_sets_the_applications_log_observer(tmp_path, monkeypatch):
    monkeypatch.delenv("PAXCHAT_LOG_FORMAT", raising=False)
    ini = tmp_path / "cluster.ini"
    ini.write_text(INI)
    options = tap.Options()
    options.parseOptions(["--config", str(ini), "--node", "1", "--log-format", "json"])
    application = service.Application("paxchat")
    tap.makeService(options).setServiceParent(application)
    assert ILogObserver.providedBy(application.getComponent(ILogObserver))

    options = tap.Options()
    options.parseOptions(["--config", str(ini), "--node", "1"])
    application = service.Application("paxchat")
    tap.makeService(options).setServiceParent(application)
    assert application.getComponent(ILogObserver) is None  # twistd's own logging

    monkeypatch.setenv("PAXCHAT_LOG_FORMAT", "text")
    options = tap.Options()
    options.parseOptions(["--config", str(ini), "--node", "1"])
    assert options["log_observer"] is not None
    with pytest.raises(usage.UsageError, match="unknown log format 'xml'"):
        tap.Options().parseOptions(["--config", str(ini), "--node", "1", "--log-format", "xml"])


def parsed_by_twistd(ini, *extra):
    """paxchat's Options as twistd parses them (its sub-command, with twistd's own options)."""
    from twisted.scripts.twistd import ServerOptions
    options = ServerOptions()
    options.parseOptions(["-n", "--pidfile=", "paxchat", "--config", str(ini), "--node", "1",
                          *extra])
    return options.subOptions


def _config_and_environ(tmp_path, monkeypatch, environ):
    """A cluster.ini to start node 1 of, with only ``environ``'s PAXCHAT_LOG_* set."""
    monkeypatch.delenv("PAXCHAT_LOG_FORMAT", raising=False)
    monkeypatch.delenv("PAXCHAT_LOG_LEVEL", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    ini = tmp_path / "cluster.ini"
    ini.write_text(INI)
    return ini


@pytest.mark.parametrize("asked, environ, shown", [
    ((), {}, ["info", "warn"]),                              # no debug lines by default
    (("--log-level", "warn"), {}, ["warn"]),
    (("--log-level", "DEBUG"), {}, ["debug", "info", "warn"]),
    ((), {"PAXCHAT_LOG_LEVEL": "warn"}, ["warn"]),
    (("--log-level", "info"), {"PAXCHAT_LOG_LEVEL": "warn"}, ["info", "warn"]),
    # journalctl's name for it, as in `journalctl -p warning`.
    (("--log-level", "warning"), {}, ["warn"]),
    ((), {"PAXCHAT_LOG_LEVEL": "Warning"}, ["warn"]),
])
def test_the_level_applies_to_twistds_own_log_format(tmp_path, monkeypatch, capsys,
                                                     asked, environ, shown):
    import re
    ini = _config_and_environ(tmp_path, monkeypatch, environ)
    options = parsed_by_twistd(ini, *asked)
    application = service.Application("paxchat")
    tap.makeService(options).setServiceParent(application)
    log = Logger(namespace="paxchat.test", observer=application.getComponent(ILogObserver))
    log.debug("d")
    log.info("i")
    log.warn("w")
    lines = capsys.readouterr().out.splitlines()
    # twistd's own format: "<time> [paxchat.test#info] i"
    assert [re.search(r" \[paxchat\.test#(\w+)\] \w$", line).group(1) for line in lines] == shown


@pytest.mark.parametrize("asked, environ", [
    (("--log-level", "bogus"), {}),
    (("--log-level", "bogus", "--log-format", "json"), {}),
    ((), {"PAXCHAT_LOG_LEVEL": "bogus"}),
])
def test_an_unknown_level_is_refused_with_or_without_a_format(tmp_path, monkeypatch,
                                                              asked, environ):
    ini = _config_and_environ(tmp_path, monkeypatch, environ)
    with pytest.raises(usage.UsageError) as info:
        tap.Options().parseOptions(["--config", str(ini), "--node", "1", *asked])
    assert str(info.value) == ("unknown log level 'bogus' "
                               "(use one of debug, info, warn, error, critical; warning is warn)")


# -- no secrets in the logs -----------------------------------------------------

PASSWORD = "correct-horse-battery-42"
NEW_PASSWORD = "other-secret-pw-77"


def assert_no_secrets(text, tokens):
    secrets = [PASSWORD, NEW_PASSWORD]
    for token in tokens:
        secrets += [token, hashlib.sha256(token.encode()).hexdigest()]
    for secret in secrets:
        assert secret not in text, f"{secret!r} appears in the log"


@defer.inlineCallbacks
def exercise(request):
    """Every op that carries a password or a session, with both right and wrong values."""
    tokens = []

    def ok(answer):
        assert answer["ok"], answer
        return answer["result"]

    ok((yield request("create_account", username="alice", password=PASSWORD)))
    ok((yield request("create_account", username="bob", password=NEW_PASSWORD)))
    bad = yield request("login", username="alice", password=NEW_PASSWORD)
    assert bad["error"]["code"] == "bad_credentials"
    session = ok((yield request("login", username="alice", password=PASSWORD)))["session"]
    tokens.append(session)
    ok((yield request("send_message", to="bob", body="hi bob", client_msg_id="m1")))
    ok((yield request("resume", session=session)))
    bad = yield request("resume", session=session[::-1])
    assert bad["error"]["code"] == "bad_session"
    tokens.append(session[::-1])
    ok((yield request("logout")))
    session = ok((yield request("login", username="alice", password=PASSWORD)))["session"]
    tokens.append(session)
    bad = yield request("delete_account", password=NEW_PASSWORD)
    assert bad["error"]["code"] == "bad_credentials"
    ok((yield request("delete_account", password=PASSWORD)))
    bad = yield request("resume", session=session)
    assert bad["error"]["code"] == "bad_session"
    return tokens


@pytest_twisted.inlineCallbacks
def test_no_secret_in_any_log_event_of_an_in_process_node(tmp_path):
    cfg = write_ops_config(tmp_path, nodes=1, client_tls="off", bcrypt_cost=4)
    events = []
    globalLogPublisher.addObserver(events.append)
    node = NodeService(cfg, 1, reactor_())
    client = None
    try:
        node.startService()
        client = yield connect(cfg, 1)
        tokens = yield exercise(client.request)
    finally:
        if client is not None:
            client.transport.loseConnection()
        yield node.stopService()
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("log_namespace") == "paxchat.node" for e in events)
    rendered = []
    for event in events:
        rendered += [logs.format_text(event), logs.format_json(event), eventAsJSON(event),
                     repr({k: v for k, v in event.items() if k != "log_source"})]
    assert_no_secrets("\n".join(rendered), tokens)


@pytest_twisted.inlineCallbacks
def test_no_secret_in_the_complete_output_of_twistd_nodes(cluster_factory, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PAXCHAT_LOG_FORMAT", "json")
    monkeypatch.setenv("PAXCHAT_LOG_LEVEL", "debug")
    cluster = cluster_factory(nodes=3)
    cluster.start()
    yield cluster.wait_ready()
    if HAS_REPLICATED_LOG:
        yield cluster.wait_leader()
    client = cluster.client(only=1)  # node 1 forwards to the leader when it is not

    def request(op, **args):
        call = getattr(client, {"send_message": "send_message"}.get(op, op))
        d = call(**args) if args else call()
        return d.addCallbacks(lambda result: {"ok": True, "result": result},
                              lambda f: {"ok": False, "error": {"code": getattr(
                                  f.value, "code", repr(f.value))}})

    tokens = yield exercise(request)
    yield cluster.close_clients()
    yield cluster.stop_gracefully()
    output = "\n".join(cluster.output(n) for n in cluster.node_ids)
    records = [json.loads(line) for line in output.splitlines()
               if line.startswith("{")]
    assert records and all(r["node"] in cluster.node_ids for r in records)
    assert {r["node"] for r in records if r["namespace"] == "paxchat.node"} == {1, 2, 3}
    if HAS_REPLICATED_LOG:  # the events an operator needs, in plain words
        messages = [r["message"] for r in records]
        assert any(" leader is now " in m for m in messages)
        assert any(m.startswith("peer link outbound with node") and " up " in m for m in messages)
        assert any(m.startswith("peer link") and " down: " in m for m in messages)
    assert_no_secrets(output, tokens)


def test_an_occasional_event_is_reported_once_per_interval_with_its_count():
    from twisted.internet.task import Clock

    from paxchat.logs import Occasional
    clock = Clock()
    report = Occasional(clock, 60.0)
    assert report.happened() == 1            # the first one is reported at once
    assert [report.happened() for _ in range(3)] == [0, 0, 0]
    clock.advance(59.9)
    assert report.happened() == 0
    clock.advance(0.1)
    assert report.happened() == 5            # the four held back, and this one
    clock.advance(600)
    assert report.happened() == 1


def test_occasional_events_of_different_kinds_are_counted_apart():
    from twisted.internet.task import Clock

    from paxchat.logs import OccasionalByKind
    clock = Clock()
    reports = OccasionalByKind(clock, 60.0)
    assert [reports.happened("a"), reports.happened("b"), reports.happened("a")] == [1, 1, 0]
    clock.advance(60)
    assert [reports.happened("a"), reports.happened("b")] == [2, 1]


def test_without_twistds_observer_factory_a_node_still_starts_and_says_the_level_is_not_applied(
        tmp_path, monkeypatch, capsys):
    from twisted.scripts import twistd
    ini = _config_and_environ(tmp_path, monkeypatch, {})

    def gone(options):
        raise AttributeError("no such factory in this Twisted")
    monkeypatch.setattr(twistd._SomeApplicationRunner, "loggerFactory", gone)
    options = parsed_by_twistd(ini, "--log-level", "warn")
    assert options["log_observer"] is None             # twistd's own, unfiltered
    assert "--log-level applies only with --log-format" in capsys.readouterr().err
