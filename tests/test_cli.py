"""The paxchat CLI without a network: parsing, output, credentials, the prompt."""

import os
import stat

import pytest
from twisted.internet import defer

from paxchat.client import cli
from paxchat.client.cli_format import format_accounts, format_history, format_message, format_messages, format_read
from paxchat.client.credentials import NoPassword, SessionCache, get_password
from paxchat.client.errors import ServerError, Unreachable
from paxchat.client.explain import ERROR_SENTENCES, explain
from paxchat.client.shell import Shell

UTC = __import__("time").gmtime
MSG = {"id": 12, "from": "bob", "to": "alice", "body": "hi\nthere", "ts": 0.0, "read": False}


class StubClient:
    """Answers every op from a table; records the calls."""

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.calls = []
        self.username = None
        self.session = None

    def _op(self, op, *args, **kwargs):
        self.calls.append((op, args, kwargs))
        answer = self.answers.get(op, {})
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def __getattr__(self, op):
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda *a, **k: self._op(op, *a, **k)

    def login(self, username, password):
        self.username = username
        return self._op("login", username, password)


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def console(env=None, answers=()):
    out, err, asked = [], [], []
    replies = list(answers)

    def ask(prompt):
        asked.append(prompt)
        return replies.pop(0)
    return cli.Console(out=out.append, err=err.append, ask=ask, ask_name=ask, env=env or {}), out, err, asked


def run(client, args, con, cache=None):
    results = []
    cli.run_command(client, args, con, cache).addBoth(results.append)
    assert results, "the command did not finish"
    return results[0]


# -- parsing -----------------------------------------------------------------------

def test_parses_global_options_and_subcommands():
    args = parse("--config", "c.ini", "--node", "2", "--user", "alice", "send", "bob", "hi there")
    assert (args.config, args.node, args.user, args.command, args.to, args.body) == \
        ("c.ini", 2, "alice", "send", "bob", "hi there")
    assert parse("history", "--peer", "bob").peer == "bob"
    assert parse("list", "a*").pattern == "a*"
    assert parse("list").pattern == "*"
    assert parse("delete", "3", "#4").ids == [3, 4]
    assert parse().command is None


def test_send_takes_the_words_of_an_unquoted_message_as_the_prompt_does():
    assert parse("send", "bob", "hello", "world").body == "hello world"
    assert parse("send", "bob", "kept  as\ntyped").body == "kept  as\ntyped"
    assert parse("send", "bob", "  ", "hi").body == "   hi"


@pytest.mark.parametrize("argv", [["delete"], ["delete", "x"], ["read", "--limit", "0"], ["send", "bob"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


@pytest.mark.parametrize("argv, why", [
    (["list", "al%"], "'al%' is not a pattern: use 1 to 64 of A-Z a-z 0-9 _ . - * ?"),
    (["list", "a" * 65], "is not a pattern"),
    (["list", "--limit", "5000"], "'5000' is not from 1 to 1,000"),
    (["read", "--limit", "100000"], "'100000' is not from 1 to 1,000"),
    (["history", "--limit", "1001"], "'1001' is not from 1 to 1,000"),
    (["send", "bob", ""], "the message is empty"),
    (["send", "bob", "  \n "], "the message is empty"),
    # Before a password is asked for (twice) in vain.
    (["create-account", "bad name"], "'bad name' is not a username: use 1 to 32 of A-Z a-z 0-9 _ . -"),
    (["create-account", "a" * 33], "is not a username"),
])
def test_arguments_the_server_would_refuse_are_caught_with_a_sentence(argv, why, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert why in capsys.readouterr().err


@pytest.mark.parametrize("line, why", [
    ("list al%", "Usage: list [PATTERN] ('al%' is not a pattern: use 1 to 64 of A-Z a-z 0-9 _ . - * ?)"),
    ("read 100000", "Usage: read [N] ('100000' is not from 1 to 1,000)"),
    ("history bob 5000", "Usage: history [PEER] [N] ('5000' is not from 1 to 1,000)"),
    ("history 0", "Usage: history [PEER] [N] ('0' is not from 1 to 1,000)"),
    ("register b@d", "Usage: register USER ('b@d' is not a username: use 1 to 32 of A-Z a-z 0-9 _ . -)"),
])
def test_the_prompt_catches_arguments_the_server_would_refuse(line, why):
    client = StubClient()
    asked = []
    shell, lines = shell_with(client)
    shell.ask_secret = lambda prompt: asked.append(prompt) or defer.succeed("pw-123456")
    shell.handle(line)
    assert lines == [why] and client.calls == [] and asked == []
    assert shell.failed


# -- formatting ----------------------------------------------------------------------

def test_message_format_has_id_time_names_and_indented_body():
    text = format_message(MSG, me="alice", localtime=UTC)
    assert text == "#12 1970-01-01 00:00  bob -> alice  (new)\n    hi\n    there"
    assert "(new)" not in format_message(MSG, me="bob", localtime=UTC)


def test_a_message_sent_says_when_its_recipient_has_read_it():
    assert format_message(MSG, me="bob", localtime=UTC).split("\n")[0] == "#12 1970-01-01 00:00  bob -> alice"
    read = dict(MSG, read=True)
    assert format_message(read, me="bob", localtime=UTC).split("\n")[0] == "#12 1970-01-01 00:00  bob -> alice  (read)"
    assert "(read)" not in format_message(read, me="alice", localtime=UTC)            # hers: read, not new
    assert "(read)" not in format_message(dict(read, to="bob"), me="bob", localtime=UTC)   # a note to oneself


def test_control_characters_in_a_body_are_shown_not_obeyed():
    body = "\x1b[2J\x1b[31mred\x07\rfake\x9b\x7f\ttab\n#99 2026-01-01 00:00  alice -> bob"
    text = format_message(dict(MSG, body=body), "alice", UTC)
    assert not any(c in text for c in "\x1b\x07\r\x9b\x7f")
    head, first, second = text.split("\n")
    assert head == "#12 1970-01-01 00:00  bob -> alice  (new)"
    assert first == "    \\x1b[2J\\x1b[31mred\\x07\\x0dfake\\x9b\\x7f\ttab"
    assert second == "    #99 2026-01-01 00:00  alice -> bob"      # indented: not a header


def test_bidirectional_overrides_and_line_separators_are_shown_not_obeyed():
    body = "pay \u202eevil\u202c to \u2066x\u2069 \u200f\u2028done, é and 🎉 stay"
    text = format_message(dict(MSG, body=body), "alice", UTC)
    assert text.split("\n")[1] == ("    pay \\u202eevil\\u202c to \\u2066x\\u2069 \\u200f\\u2028done,"
                                   " é and 🎉 stay")


def test_pushed_messages_and_account_lists_are_shown_not_obeyed():
    client = StubClient()
    client.username = "alice"
    shell, lines = shell_with(client)
    shell.on_event({"event": "message", "message": dict(MSG, body="\x1b]0;pwned\x07")})
    assert lines[-1].endswith("    \\x1b]0;pwned\\x07")
    assert format_accounts(["a\x1bb"], True) == "a\\x1bb\n(more; continue with --after a\\x1bb)"


def test_empty_lists_say_so():
    assert format_messages([]) == "(no messages)"
    # read: nothing to read is one line; else the messages and what is left.
    assert format_read({"messages": [], "unread": 0}) == "(no unread messages)"
    assert format_read({"messages": [MSG], "unread": 2}, me="alice", localtime=UTC).endswith("    there\n(2 unread left)")
    assert format_accounts([], False) == "(no matching accounts)"
    assert format_accounts(["a", "b"], True).endswith("(more; continue with --after b)")


def test_history_with_a_peer_marks_where_a_new_account_of_the_name_begins():
    old = [dict(MSG, id=i, ts=100.0 + i, **{"from": "bob"}) for i in (1, 2)]
    new = dict(MSG, id=3, ts=200.0, **{"from": "bob"})
    page = {"messages": [new, *reversed(old)], "more": False, "peer_created": 150.0}
    lines = format_history(page, "alice", "bob", localtime=UTC).split("\n")
    mark = [n for n, line in enumerate(lines) if line.startswith("--- bob is a new account since")]
    assert len(mark) == 1 and lines[mark[0]].endswith("with an earlier account of that name ---")
    assert lines[mark[0] - 3].startswith("#2 ") and lines[mark[0] + 1].startswith("#3 ")   # two body lines each
    # All of them before it: the mark comes last; none before it, or no peer: no mark.
    assert format_history(dict(page, messages=old[::-1]), "alice", "bob", UTC).split("\n")[-1].startswith("--- bob")
    assert "---" not in format_history(dict(page, messages=[new]), "alice", "bob", UTC)
    assert "---" not in format_history(page, "alice", None, UTC)
    # The name is free now; an earlier build's answer says nothing.
    assert format_history(dict(page, peer_created=None), "alice", "bob", UTC).endswith(
        "(no account is named bob now: it was deleted)")
    assert format_history({"messages": [new], "more": False}, "alice", "bob", UTC) == format_messages([new], "alice", UTC)
    assert format_history({"messages": [], "peer_created": None}, "alice", "bob", UTC) == "(no messages)"


def test_every_error_code_has_a_sentence_and_none_is_a_traceback():
    for code in ("invalid_username", "invalid_password", "username_taken", "bad_credentials",
                 "no_such_user", "body_too_large", "not_logged_in", "unavailable", "rate_limited",
                 "invalid_request", "unknown_op", "frame_too_large", "internal", "bad_session",
                 "upgrade_in_progress"):
        assert code in ERROR_SENTENCES
        sentence = explain(ServerError(code, "details"))
        assert sentence[0].isupper() and "Traceback" not in sentence
    assert "7101" in explain(Unreachable("no paxchat node could be reached: 127.0.0.1:7101"))
    assert explain(ServerError("brand_new", "odd thing")) == "The server refused: odd thing"


# -- credentials ---------------------------------------------------------------------

def test_password_from_env_else_asked_and_confirmed():
    assert get_password(env={"PAXCHAT_PASSWORD": "from-env"}, ask=None) == "from-env"
    assert get_password(env={}, ask=lambda p: "typed-pw") == "typed-pw"
    # Two that differ are asked again, saying why; three times in all.
    prompts, answers = [], iter(["one-pass", "two-pass", "one-pass", "one-pass"])

    def ask(prompt):
        prompts.append(prompt)
        return next(answers)
    assert get_password("Choose: ", env={}, confirm=True, ask=ask) == "one-pass"
    assert prompts == ["Choose: ", "Repeat the password: ",
                       "The two passwords differ; try again.\nChoose: ", "Repeat the password: "]
    answers = iter(["a-pass", "b-pass"] * 3)
    with pytest.raises(NoPassword) as failed:
        get_password(env={}, confirm=True, ask=lambda p: next(answers))
    assert str(failed.value) == "the two passwords differed 3 times" and not failed.value.no_terminal
    with pytest.raises(NoPassword) as failed:
        get_password(env={}, ask=lambda p: "")
    assert not failed.value.no_terminal

    def eof(prompt):
        raise EOFError
    with pytest.raises(NoPassword) as failed:
        get_password(env={}, ask=eof)
    assert failed.value.no_terminal


def test_a_new_password_too_short_is_asked_again_before_it_is_repeated():
    """Not typed twice and only then refused by the server."""
    client = StubClient()
    con, out, err, asked = console(answers=["short", "long-enough", "long-enough"])
    run(client, parse("create-account", "frank"), con)
    assert asked == ["Choose a password for frank: ",
                     "That password is 5 bytes long; use 8 to 1,024 bytes; try again.\n"
                     "Choose a password for frank: ", "Repeat the password: "]
    assert client.calls == [("create_account", ("frank", "long-enough"), {})]
    con, out, err, asked = console(answers=["short"] * 3)
    failure = run(StubClient(), parse("create-account", "frank"), con)
    assert str(failure.value) == "That password is 5 bytes long; use 8 to 1,024 bytes (asked 3 times)"
    assert "Repeat the password: " not in asked
    # At the prompt: said before the repeat, and nothing is created.
    client = StubClient()
    shell, lines = shell_with(client, secrets=["short"])
    shell.handle("register frank")
    assert lines == ["Error: That password is 5 bytes long; use 8 to 1,024 bytes; nothing was created."]
    assert client.calls == [] and shell.failed


def test_a_password_given_up_at_a_terminal_is_not_told_to_use_a_terminal():
    client = StubClient()
    con, out, err, asked = console(answers=["a-passwd", "b-passwd"] * 3)
    failure = run(client, parse("create-account", "frank"), con)
    assert failure.check(cli.CommandFailed) and failure.value.status == cli.EXIT_USAGE
    assert str(failure.value) == "the two passwords differed 3 times"
    assert len(asked) == 6 and client.calls == []


def test_session_cache_is_private(tmp_path):
    cache = SessionCache(tmp_path / "paxchat")
    assert cache.load("alice") is None
    assert cache.save("alice", "tok")
    path = tmp_path / "paxchat" / "session-alice"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert cache.load("alice") == "tok"
    cache.forget("alice")
    assert cache.load("alice") is None


# -- one-shot commands ------------------------------------------------------------------

def test_send_logs_in_with_env_password_and_caches_the_session(tmp_path):
    client = StubClient({"login": {"session": "tok", "unread": 0}, "send_message": {"message_id": 41, "ts": 1}})
    con, out, err, _ = console(env={"PAXCHAT_PASSWORD": "pw-123456"})
    cache = SessionCache(tmp_path)
    assert run(client, parse("--user", "alice", "send", "bob", "hi"), con, cache) is None
    assert client.calls[0] == ("login", ("alice", "pw-123456"), {})
    assert client.calls[1] == ("send_message", ("bob", "hi"), {})
    assert out == ["Sent #41 to bob."]
    assert cache.load("alice") == "tok"


def test_logout_ends_the_session_kept_here_and_logs_in_for_nothing(tmp_path):
    cache = SessionCache(tmp_path)
    client = StubClient()
    con, out, _, asked = console()
    run(client, parse("--user", "alice", "logout"), con, cache)
    assert out == ["No session of alice is kept here: nothing to log out."]
    assert client.calls == [] and asked == []
    cache.save("alice", "tok")
    run(client, parse("--user", "alice", "logout"), con, cache)
    assert [c[0] for c in client.calls] == ["resume", "logout"] and client.calls[0][1] == ("tok",)
    assert out[-1] == "Logged out alice." and cache.load("alice") is None
    # Ended elsewhere already: forgotten here too, with no password asked for.
    cache.save("alice", "old")
    client = StubClient({"resume": ServerError("bad_session", "gone")})
    run(client, parse("--user", "alice", "logout"), con, cache)
    assert [c[0] for c in client.calls] == ["resume"] and asked == []
    assert out[-1] == "Logged out alice." and cache.load("alice") is None
    # The cluster did not answer: kept, to try again.
    cache.save("alice", "tok")
    client = StubClient({"logout": Unreachable("no paxchat node could be reached")})
    failure = run(client, parse("--user", "alice", "logout"), con, cache)
    assert failure.check(Unreachable) and cache.load("alice") == "tok"


def test_without_a_terminal_no_username_is_asked_for(monkeypatch, capsys):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("alice\n"))       # not a terminal
    con = cli.Console(out=[].append, err=[].append, env={})
    with pytest.raises(cli.CommandFailed) as failed:
        cli._username(parse("read"), con)
    assert str(failed.value) == "give a username with --user or $PAXCHAT_USER"
    assert capsys.readouterr().out == ""                            # no "Username: " printed


def test_cached_session_is_resumed_without_a_password(tmp_path):
    cache = SessionCache(tmp_path)
    cache.save("alice", "tok")
    client = StubClient({"read_messages": {"messages": [MSG], "unread": 3}})
    con, out, _, asked = console()
    run(client, parse("--user", "alice", "read"), con, cache)
    assert [c[0] for c in client.calls] == ["resume", "read_messages"]
    assert asked == []
    assert out[-1].endswith("\n(3 unread left)") and "#12" in out[0]


def test_stale_cached_session_falls_back_to_the_prompted_password(tmp_path):
    cache = SessionCache(tmp_path)
    cache.save("alice", "old")
    client = StubClient({"resume": ServerError("bad_session", "gone"), "login": {"session": "new"},
                         "history": {"messages": [dict(MSG, id=2), dict(MSG, id=1)]}})
    con, out, _, asked = console(answers=["typed-pw"])
    run(client, parse("--user", "alice", "history", "--peer", "bob"), con, cache)
    assert asked == ["Password for alice: "]
    assert client.calls[-1] == ("history", (), {"peer": "bob", "before": None, "limit": 20})
    assert out[0].index("#1 ") < out[0].index("#2 ")   # oldest first
    assert cache.load("alice") == "new"


def test_history_says_how_to_see_older_messages_when_the_server_has_more(tmp_path):
    cache = SessionCache(tmp_path)
    cache.save("alice", "tok")
    for answer, last in (({"messages": [dict(MSG, id=9), dict(MSG, id=7)], "more": True},
                          "(older messages: add --before 7)"),
                         ({"messages": [dict(MSG, id=7)], "more": False}, None)):
        con, out, _, _ = console()
        run(StubClient({"history": answer}), parse("--user", "alice", "history"), con, cache)
        if last:
            assert out[-1] == last
        else:
            assert not any("older" in line for line in out)


def test_create_account_asks_twice_and_reports():
    client = StubClient({"create_account": {"username": "carol"}})
    con, out, _, asked = console(answers=["pw-123456", "pw-123456"])
    run(client, parse("create-account", "carol"), con)
    assert client.calls == [("create_account", ("carol", "pw-123456"), {})]
    assert out == ["Account carol created."] and len(asked) == 2


def test_delete_account_always_asks_for_the_password(tmp_path):
    cache = SessionCache(tmp_path)
    cache.save("alice", "tok")
    client = StubClient()
    con, out, _, asked = console(answers=["pw-123456"])
    run(client, parse("--user", "alice", "delete-account"), con, cache)
    assert client.calls[-1] == ("delete_account", ("pw-123456",), {})
    assert cache.load("alice") is None and out == ["Account alice deleted."]


def test_server_errors_propagate_for_main_to_explain():
    client = StubClient({"login": {"session": "t"}, "send_message": ServerError("no_such_user", "no bob")})
    con, out, err, _ = console(env={"PAXCHAT_PASSWORD": "pw-123456"})
    failure = run(client, parse("--user", "alice", "send", "bob", "x"), con)
    assert failure.value.code == "no_such_user"


def test_a_message_too_large_once_encoded_is_one_clear_line_and_status_1(monkeypatch):
    from twisted.internet.testing import MemoryReactorClock
    from paxchat.client.api import PaxchatClient

    class Client(StubClient):
        def send_message(self, to, body):   # the real library's check, with no cluster behind it
            return PaxchatClient(MemoryReactorClock(), [object()]).send_message(to, body)

        def close(self):
            return defer.succeed(None)
    client = Client({"login": {"session": "t"}})
    monkeypatch.setattr(cli, "_load_config", lambda path: None)
    monkeypatch.setattr(cli, "make_client", lambda reactor, config, args, **kw: client)
    con, out, err, _ = console(env={"PAXCHAT_PASSWORD": "pw-123456"})
    status = []
    cli.run(None, parse("--user", "alice", "--no-session-cache", "send", "bob", "🎉" * 16384),
            con).addBoth(status.append)
    assert status == [1] and out == []
    assert err == ["paxchat: That message is too large to send: 65,636 bytes once encoded, at most 65,536"
                   " (emoji and many other characters take 4 bytes each)."]


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch):
    """``paxchat ... history | head``: no word on stderr once head has what it wants."""
    client = StubClient({"history": {"messages": [MSG], "more": False}})
    monkeypatch.setattr(cli, "_load_config", lambda path: None)
    monkeypatch.setattr(cli, "make_client", lambda reactor, config, args, **kw: client)

    def closed_pipe(text):
        raise BrokenPipeError(32, "Broken pipe")
    closed = []
    con, _, err, _ = console(env={"PAXCHAT_PASSWORD": "pw-123456"})
    con.out, con.out_closed = closed_pipe, lambda: closed.append(True)
    status = []
    cli.run(None, parse("--user", "alice", "--no-session-cache", "history"), con).addBoth(status.append)
    # The history was read: the exit status says so, whatever the pipe did.
    assert (status, err, closed) == ([0], [], [True])


def test_a_bad_config_is_one_line_and_status_2(tmp_path):
    bad = tmp_path / "cluster.ini"
    bad.write_text("[cluster]\nbogus = 1\n")
    con, out, err, _ = console()
    status = []
    cli.run(None, parse("--config", str(bad), "list"), con).addBoth(status.append)
    assert status == [2]
    assert len(err) == 1 and "bogus" in err[0] and err[0].startswith("paxchat: ")


def test_main_exits_cleanly_without_a_traceback(tmp_path):
    import subprocess
    import sys
    missing = tmp_path / "nope.ini"
    proc = subprocess.run([sys.executable, "-m", "paxchat.client.cli", "--config", str(missing), "read"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"paxchat: {missing}: no such file"


# -- the interactive shell ---------------------------------------------------------------

def shell_with(client, secrets=()):
    lines = []
    replies = list(secrets)
    shell = Shell(client, lines.append, lambda prompt: defer.succeed(replies.pop(0)), lambda: lines.append("<quit>"))
    return shell, lines


def test_shell_login_send_read_and_unknown_commands():
    client = StubClient({"login": {"session": "t", "unread": 2}, "send_message": {"message_id": 5},
                         "read_messages": {"messages": [MSG], "unread": 0}})
    shell, lines = shell_with(client, ["pw-123456"])
    shell.handle("login alice")
    assert lines[-1] == "Logged in as alice; 2 unread message(s)."
    assert shell.prompt == "alice> "
    shell.handle("send bob  hello   world ")
    assert client.calls[-1] == ("send_message", ("bob", " hello   world"), {})
    shell.handle("read 5")
    assert client.calls[-1] == ("read_messages", (5,), {})
    shell.handle("frobnicate")
    assert "Unknown command" in lines[-1]
    shell.handle("send bob")
    assert lines[-1].startswith("Usage:")
    shell.handle("quit")
    assert lines[-1] == "<quit>"


def test_one_shot_and_prompt_agree_on_defaults_and_what_a_send_says(capsys):
    client = StubClient({"login": {"session": "t"}, "send_message": {"message_id": 4},
                         "history": {"messages": []}, "read_messages": {"messages": [], "unread": 0}})
    con, out, _, _ = console(env={"PAXCHAT_PASSWORD": "pw-123456"})
    for argv in (["send", "bob", "hi"], ["history"], ["read"]):
        run(client, parse("--user", "alice", *argv), con)
    one_shot = [c for c in client.calls if c[0] != "login"]
    client.calls.clear()
    shell, lines = shell_with(client)
    for line in ("send bob hi", "history", "read"):
        shell.handle(line)
    assert out[0] == lines[0] == "Sent #4 to bob."
    assert one_shot[1][2]["limit"] == client.calls[1][2]["limit"] == 20      # history
    assert one_shot[2][1] == client.calls[2][1] == (10,)                      # read
    for command in ("history", "read"):
        with pytest.raises(SystemExit):
            parse(command, "--help")
        assert "(default: " in capsys.readouterr().out


@pytest.mark.parametrize("line,op,code", [
    ("send bob x", "send_message", "body_too_large"),
    # Settings during an upgrade say why they wait.
    ("receipts off", "set_settings", "upgrade_in_progress"),
])
def test_shell_prints_errors_as_sentences(line, op, code):
    client = StubClient({op: ServerError(code, "details")})
    shell, lines = shell_with(client)
    shell.handle(line)
    assert lines[-1] == "Error: " + ERROR_SENTENCES[code]


def test_shell_prints_pushed_messages_and_marks_them_read():
    client = StubClient()
    client.username = "alice"
    shell, lines = shell_with(client)
    shell.on_event({"event": "message", "message": MSG})
    assert lines[-1].startswith("#12 ") and "bob -> alice" in lines[-1]
    assert client.calls == [("mark_read", ([12],), {})]


def test_shell_prints_what_this_account_sent_elsewhere_and_marks_nothing():
    client = StubClient()
    client.username = "bob"
    shell, lines = shell_with(client)
    shell.on_event({"event": "sent", "message": MSG})
    assert lines[-1].startswith("#12 ") and "bob -> alice" in lines[-1] and "(new)" not in lines[-1]
    assert client.calls == []


def test_shell_history_list_delete_parsing():
    client = StubClient({"history": {"messages": []}, "list_accounts": {"accounts": ["al"], "more": False},
                         "delete_messages": {"deleted": 2}})
    shell, lines = shell_with(client)
    shell.handle("history bob 5")
    assert client.calls[-1] == ("history", (), {"peer": "bob", "limit": 5})
    shell.handle("history 7")
    assert client.calls[-1] == ("history", (), {"peer": None, "limit": 7})
    shell.handle("list a*")
    assert client.calls[-1] == ("list_accounts", ("a*",), {}) and lines[-1] == "al"
    shell.handle("delete #3 4")
    assert client.calls[-1] == ("delete_messages", ([3, 4],), {})
    assert lines[-1] == "Deleted 2 message(s)."


def test_settings_one_shot_and_at_the_prompt():
    client = StubClient({"login": {"session": "t"}, "get_settings": {"read_receipts": True},
                         "set_settings": {"read_receipts": False}})
    con, out, err, _ = console(env={"PAXCHAT_PASSWORD": "pw-123456"})
    run(client, parse("--user", "alice", "settings"), con)
    run(client, parse("--user", "alice", "settings", "--read-receipts", "OFF"), con)
    assert [c for c in client.calls if c[0] != "login"] == [
        ("get_settings", (), {}), ("set_settings", (False,), {})]
    assert out == ["read receipts: on", "read receipts: off"]
    with pytest.raises(SystemExit):
        parse("settings", "--read-receipts", "maybe")
    client.calls.clear()
    shell, lines = shell_with(client)
    shell.handle("receipts")
    shell.handle("receipts off")
    shell.handle("receipts sometimes")
    assert client.calls == [("get_settings", (), {}), ("set_settings", (False,), {})]
    assert lines == ["read receipts: on", "read receipts: off", "Usage: receipts [on|off]"]


def test_shell_prints_which_of_your_messages_were_read_or_deleted_and_settings_made_elsewhere():
    client = StubClient()
    client.username = "alice"
    shell, lines = shell_with(client)
    shell.on_event({"event": "seen", "ids": [12, 13]})
    shell.on_event({"event": "deleted", "ids": [4]})
    shell.on_event({"event": "read", "ids": [5]})           # her own reads elsewhere: nothing
    shell.on_event({"event": "seen", "ids": ["x"]})
    shell.on_event({"event": "settings", "settings": {"read_receipts": False}})
    assert lines == ["Read by its recipient: #12, #13", "Deleted: #4",
                     "read receipts: off (set elsewhere)"]
    assert client.calls == []


def test_typed_ahead_lines_go_to_password_prompts_in_order():
    from twisted.internet.testing import StringTransport
    from paxchat.client.shell import ShellProtocol
    created, connecting = [], defer.Deferred()

    class Client(StubClient):
        def create_account(self, username, password):
            created.append((username, password))
            return defer.succeed({})

    done = defer.Deferred()

    def make_shell(proto):
        shell = Shell(Client(), proto.write, proto.ask_secret, proto.transport.loseConnection)
        proto.run_first(lambda: connecting)
        return shell
    proto = ShellProtocol(make_shell, done, stdin_fd=-1)
    transport = StringTransport()
    proto.makeConnection(transport)
    # Everything arrives before the connection is even up.
    proto.dataReceived(b"register carol\npw-123456\npw-123456\nlist\nquit\n")
    assert created == []
    connecting.callback(None)
    assert created == [("carol", "pw-123456")]
    output = transport.value().decode()
    assert "Unknown command" not in output and "differ" not in output
    assert transport.disconnecting


def _shell_protocol(client):
    """A ShellProtocol fed from a pipe, as ``interactive`` wires it, over a
    StringTransport (standard output); (protocol, transport, done).
    ``proto.errors`` is its standard error."""
    import io
    from twisted.internet.testing import StringTransport
    from paxchat.client.shell import ShellProtocol
    done = defer.Deferred()

    def make_shell(proto):
        return Shell(client, proto.write, proto.ask_secret, proto.transport.loseConnection, note=proto.note)
    errors = io.StringIO()
    proto = ShellProtocol(make_shell, done, stdin_fd=-1, stderr=errors)
    proto.errors = errors
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, done


def test_fed_from_a_pipe_the_prompt_prints_answers_alone_and_at_a_terminal_a_prompt():
    from twisted.internet.testing import StringTransport
    from paxchat.client.api import Status
    from paxchat.client.shell import ShellProtocol
    client = StubClient({"list_accounts": {"accounts": ["bob"]}})
    proto, transport, done = _shell_protocol(client)     # standard input: not a terminal
    proto.dataReceived(b"list\nbogus\n")
    proto.shell.on_status(Status("connected", node=2))
    # The answers alone on standard output; what is not one on standard error.
    assert transport.value().decode() == "bob" + os.linesep
    assert proto.errors.getvalue() == "Unknown command 'bogus'; type 'help' for the list.\nConnected to node 2.\n"
    # A new leader, told by the node (leader events), is no news at the prompt; a reconnect is.
    proto.shell.on_status(Status("connected", node=2, leader=3))
    proto.shell.on_status(Status("reconnecting", leader=3))
    proto.shell.on_status(Status("connected", node=2, leader=3))
    assert proto.errors.getvalue().count("Connected to node 2.") == 2
    leader, follower = os.openpty()
    try:
        proto = ShellProtocol(lambda p: Shell(client, p.write, p.ask_secret, lambda: None), defer.Deferred(),
                              stdin_fd=follower)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"list\n")
    finally:
        os.close(leader)
        os.close(follower)
    shown = transport.value().decode()
    assert shown.startswith("\rType 'help' for commands.") and "\rbob" + os.linesep + "paxchat> " in shown


def test_end_of_input_runs_every_line_read_before_it_then_ends():
    sent = defer.Deferred()

    class Client(StubClient):
        def send_message(self, to, body):
            self.calls.append(("send_message", (to, body), {}))
            return sent
    client = Client({"read_messages": {"messages": [], "unread": 0}})
    proto, transport, done = _shell_protocol(client)
    proto.dataReceived(b"send bob hi there\nread")   # the last line has no newline
    proto.readConnectionLost()                          # as `printf ... | paxchat` ends
    assert not transport.disconnecting                  # the send is still running
    sent.callback({"message_id": 7})
    assert [c[0] for c in client.calls] == ["send_message", "read_messages"]
    assert client.calls[0][1] == ("bob", "hi there")
    assert transport.disconnecting                      # then it ends, as quit would
    proto.connectionLost()
    assert done.called


def test_end_of_input_at_a_password_prompt_fails_the_login_and_ends():
    logins = []

    class Client(StubClient):
        def login(self, username, password):
            logins.append(password)
            return defer.succeed({"session": "t", "unread": 0})
    proto, transport, done = _shell_protocol(Client())
    proto.dataReceived(b"login alice\n")
    assert not transport.disconnecting                  # waiting for the password
    proto.readConnectionLost()
    assert logins == []
    assert "input closed" in proto.errors.getvalue()
    assert transport.disconnecting


def test_end_of_input_after_stdout_closed_still_ends_the_program():
    proto, transport, done = _shell_protocol(StubClient())
    proto.writeConnectionLost()                         # e.g. piped into a pager that quit
    assert not done.called                              # input may still come
    proto.readConnectionLost()
    assert done.called


def test_after_end_of_input_a_client_that_reaches_no_server_gives_up_with_status_1():
    never = defer.Deferred()

    class Client(StubClient):
        def read_messages(self, limit=None):
            return never                                # waits for a server, as when all are down
    proto, transport, done = _shell_protocol(Client())
    proto.offline(True)                                 # input still open: someone may wait
    assert not transport.disconnecting
    proto.dataReceived(b"read\nsend bob not run\n")
    proto.readConnectionLost()
    assert transport.disconnecting and proto.exit_status == 1
    assert "not run" in proto.errors.getvalue()
    proto.connectionLost()
    assert done.result == 1


@pytest.mark.parametrize("lines, status", [
    (b"read\nlist\n", 0),
    (b"read\nbogus\nlist\n", 1),                      # an unknown command
    (b"read 0\nlist\n", 1),                            # a usage mistake
    (b"send carol hi\nlist\n", 1),                     # the server refused
    (b"delete-account\nlist\n", 1),                    # not logged in
])
def test_the_prompt_ends_with_status_1_when_any_line_failed(lines, status):
    client = StubClient({"read_messages": {"messages": [], "unread": 0}, "list_accounts": {"accounts": []},
                         "send_message": ServerError("no_such_user", "no account named carol")})
    proto, transport, done = _shell_protocol(client)
    proto.dataReceived(lines)
    proto.readConnectionLost()
    assert transport.disconnecting
    assert client.calls[-1][0] == "list_accounts"       # a failure does not stop the lines after it
    proto.connectionLost()
    assert done.result == status


def test_end_of_input_waits_for_a_command_while_the_client_is_only_reconnecting():
    later = defer.Deferred()

    class Client(StubClient):
        def read_messages(self, limit=None):
            return later
    proto, transport, done = _shell_protocol(Client())
    proto.dataReceived(b"read\n")
    proto.readConnectionLost()
    proto.offline(False)                                # reconnecting, not given up
    assert not transport.disconnecting
    later.callback({"messages": [], "unread": 0})
    assert transport.disconnecting and proto.exit_status == 0


def test_shell_says_why_it_reconnects():
    from paxchat.client.api import Status
    shell, lines = shell_with(StubClient({}))
    shell.on_status(Status("reconnecting", detail="node 2 is stopping"))
    shell.on_status(Status("reconnecting"))
    assert lines == ["Connection lost (node 2 is stopping); reconnecting to another server...",
                     "Connection lost; reconnecting to another server..."]


def test_when_no_node_accepts_a_connection_the_prompt_and_a_one_shot_command_say_so_once():
    """Else a command sits silent for its whole --timeout while the client waits on."""
    from paxchat.client.api import Status
    status = Status("connecting", detail="no server is accepting connections",
                    not_accepted=(("127.0.0.1:7101", "connection refused"), ("127.0.0.1:7102", "no answer"),
                                  ("127.0.0.1:7103", "connection refused")), retry_for=14.98)
    shell, lines = shell_with(StubClient({}))
    shell.on_status(status)
    assert lines == ["No server is accepting connections (127.0.0.1:7101, 127.0.0.1:7103: connection refused;"
                     " 127.0.0.1:7102: no answer); still trying for up to 15 s."]
    con, out, err, _ = console()
    notice = cli._waiting_notice(con)
    notice(Status("connecting"))
    notice(status)
    notice(Status("reconnecting"))
    notice(status)                                  # a later campaign: said once per command
    assert out == [] and err == ["paxchat: no server is accepting connections (127.0.0.1:7101, 127.0.0.1:7103:"
                                 " connection refused; 127.0.0.1:7102: no answer); still trying for up to 15 s."]


def test_the_prompt_says_when_tls_refused_the_servers_certificates_not_that_none_is_reachable():
    from paxchat.client.api import Status
    from paxchat.client.errors import UntrustedNodes
    error = UntrustedNodes([("node 1 (127.0.0.1:7101)", "certificate not signed by the CA in certs/ca.pem", "")])
    shell, lines = shell_with(StubClient({}))
    shell.on_status(Status("failed", detail=str(error), error=error))
    assert lines == ["TLS refused the servers' certificates (certificate not signed by the CA in"
                     " certs/ca.pem); commands will try again, reading ca.pem again."]


def test_shell_says_when_servers_answer_but_too_few_to_agree():
    from paxchat.client.api import Status
    shell, lines = shell_with(StubClient({}))
    shell.on_status(Status("reconnecting", detail="node 2 could not confirm with a majority in time",
                           no_majority=True))
    shell.on_status(Status("failed", detail="servers answered, but ...", no_majority=True))
    assert lines == ["Servers answer, but too few are up to agree (node 2 could not confirm with a"
                     " majority in time); trying the others...",
                     "Too few servers are up to agree on anything; commands will try again."]
    assert not any("Cannot reach" in line or "Connection lost" in line for line in lines)


def test_the_prompt_takes_a_longest_message_and_skips_a_longer_line_but_not_the_rest():
    from paxchat.client.shell import MAX_INPUT_LINE
    client = StubClient({"send_message": {"message_id": 1}})
    proto, transport, done = _shell_protocol(client)
    longest = "🎉" * 16384
    proto.dataReceived(f"send bob {longest}\n".encode())
    too_long = b"send bob " + b"y" * MAX_INPUT_LINE
    # In pieces, as a pipe delivers it: the end of the long line comes later.
    proto.dataReceived(too_long[:70000])
    proto.dataReceived(too_long[70000:] + b"\nsend bob after long\n")
    proto.readConnectionLost()
    assert [c[1] for c in client.calls] == [("bob", longest), ("bob", "after long")]
    assert proto.errors.getvalue().count("was not run") == 1
    assert transport.disconnecting                      # ended by the end of input, not the long line


def test_a_line_too_long_is_said_in_its_turn_and_fails_a_password_prompt_it_answers():
    from paxchat.client.shell import MAX_INPUT_LINE
    logging_in = defer.Deferred()

    class Client(StubClient):
        def login(self, username, password):
            self.calls.append(("login", (username, password), {}))
            return logging_in
    client = Client({"send_message": {"message_id": 3}})
    proto, transport, done = _shell_protocol(client)
    proto.dataReceived(b"login alice\npw-123456\n")
    proto.dataReceived(b"x" * (MAX_INPUT_LINE + 10) + b"\n")
    assert "was not run" not in proto.errors.getvalue()     # the login's answer comes first
    client.username = "alice"
    logging_in.callback({"session": "t", "unread": 0})
    assert "Logged in as alice" in transport.value().decode()
    assert "Error: a line over 66,560 bytes was not run" in proto.errors.getvalue()
    # As the answer to a password prompt, it fails the command that asked.
    proto.dataReceived(b"delete-account\n" + b"y" * (MAX_INPUT_LINE + 10) + b"\nsend bob still here\n")
    proto.readConnectionLost()
    assert [c[0] for c in client.calls] == ["login", "send_message"]
    assert proto.errors.getvalue().count("was not run") == 2
    proto.connectionLost()
    assert done.result == 1


def test_the_prompt_takes_every_password_from_PAXCHAT_PASSWORD_when_set():
    client = StubClient({"login": {"session": "t", "unread": 0}})
    lines, asked = [], []
    shell = Shell(client, lines.append, lambda prompt: asked.append(prompt) or defer.succeed("typed"),
                  lambda: None, password="pw-from-env")
    shell.handle("register carol")                       # no confirmation either
    shell.handle("login alice")
    shell.handle("delete-account")
    assert asked == []
    assert [c[:2] for c in client.calls] == [("create_account", ("carol", "pw-from-env")),
                                             ("login", ("alice", "pw-from-env")),
                                             ("delete_account", ("pw-from-env",))]
    assert lines[-1] == "Account alice deleted."


def test_startup_login_uses_the_same_password_as_the_prompt():
    from paxchat.client.interactive import startup_login
    client = StubClient({"login": {"session": "t", "unread": 1}})
    lines = []
    shell = Shell(client, lines.append, lambda prompt: defer.fail(AssertionError(prompt)), lambda: None,
                  password="pw-from-env")
    startup_login(shell, "alice", None)
    assert client.calls == [("login", ("alice", "pw-from-env"), {})]
    assert lines == ["Logged in as alice; 1 unread message(s)."]


def prompt_with_user(monkeypatch, client, env):
    """``paxchat --user alice`` as ``interactive`` wires it, fed from a pipe (notes on standard
    error), with ``client``; (protocol, its standard output, the exit status when it ends, stderr)."""
    import argparse
    import io
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from paxchat.client import interactive
    held = {}

    class FakeStdio:
        @staticmethod
        def StandardIO(proto, reactor=None):
            held["proto"], held["transport"] = proto, StringTransport()
            proto.makeConnection(held["transport"])
    errors = io.StringIO()

    def make_client(reactor, config, args, on_status=None, **kw):
        client.on_status = on_status
        return client
    monkeypatch.setattr(cli, "make_client", make_client)
    monkeypatch.setattr(interactive, "stdio", FakeStdio)
    monkeypatch.setattr("sys.stderr", errors)
    status = []
    with open(os.devnull) as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        interactive.run_interactive(MemoryReactorClock(), None, argparse.Namespace(
            user="alice", no_session_cache=True), cli.Console(env=env)).addBoth(status.append)
    return held["proto"], held["transport"], status, errors


@pytest.mark.parametrize("refusal", [ServerError("bad_credentials", "wrong username or password"),
                                     Unreachable("no paxchat node could be reached: 127.0.0.1:7101")])
def test_a_prompt_that_cannot_log_in_as_user_says_why_and_ends_with_status_1(monkeypatch, refusal):
    """Not a prompt left logged out, where each line typed ahead (or piped in) would fail
    with "log in first": the user asked for alice's, as a one-shot command does. Once,
    not also that commands will try again, nor that the rest of the input is not run."""
    from paxchat.client.api import Status
    logging_in = defer.Deferred()

    class Client(StubClient):
        def login(self, username, password):
            self.calls.append(("login", (username, password), {}))
            return logging_in
    client = Client({"send_message": {"message_id": 1}})
    proto, transport, status, errors = prompt_with_user(monkeypatch, client, {"PAXCHAT_PASSWORD": "pw-123456"})
    proto.dataReceived(b"send bob hi\nread\n")
    proto.readConnectionLost()                                # the end of what was piped in
    if isinstance(refusal, Unreachable):
        client.on_status(Status("failed", detail=str(refusal)))
    logging_in.errback(refusal)
    assert [c[0] for c in client.calls] == ["login"]          # no line ran
    assert errors.getvalue() == f"Error: {explain(refusal)}\n"
    assert transport.disconnecting and transport.value() == b""
    proto.connectionLost()
    assert status == [1]


def test_a_prompt_whose_user_gives_no_password_says_how_to_give_one(monkeypatch):
    client = StubClient({"login": {"session": "t", "unread": 0}})
    proto, transport, status, errors = prompt_with_user(monkeypatch, client, {})
    assert errors.getvalue() == "Password for alice:\n"     # the next line of the pipe is the password
    proto.readConnectionLost()
    assert client.calls == []
    assert errors.getvalue().splitlines()[-1] == ("Error: no password for alice: the input ended"
                                                  " (set PAXCHAT_PASSWORD, or give it as the first line)")
    proto.connectionLost()
    assert status == [1]


def test_a_prompt_logged_in_as_user_runs_the_lines_typed_ahead(monkeypatch):
    client = StubClient({"login": {"session": "t", "unread": 3}, "send_message": {"message_id": 9}})
    proto, transport, status, errors = prompt_with_user(monkeypatch, client, {"PAXCHAT_PASSWORD": "pw-123456"})
    proto.dataReceived(b"send bob hi\n")
    proto.readConnectionLost()
    assert [c[0] for c in client.calls] == ["login", "send_message"]
    assert "Logged in as alice; 3 unread message(s)." in errors.getvalue()
    proto.connectionLost()
    assert status == [0]


def test_no_terminal_at_all_is_one_clean_error_and_nothing_else(monkeypatch, tmp_path, capfd):
    import getpass
    from paxchat.client import credentials
    monkeypatch.setattr(credentials, "TERMINAL", str(tmp_path / "no-tty"))
    monkeypatch.setattr(getpass, "getpass", lambda prompt: pytest.fail("getpass would warn and read stdin"))
    con = cli.Console(out=[].append, err=[].append, env={})
    with pytest.raises(cli.CommandFailed) as failed:
        cli._password(con)
    assert str(failed.value) == "no password given (set PAXCHAT_PASSWORD or run in a terminal)"
    assert capfd.readouterr() == ("", "")


def test_no_terminal_and_no_password_env_is_one_clean_error(monkeypatch):
    import getpass
    import warnings

    def getpass_without_a_terminal(prompt):
        warnings.warn("Can not control echo on the terminal.", getpass.GetPassWarning)
        raise EOFError
    from paxchat.client import credentials
    monkeypatch.setattr(credentials, "TERMINAL", os.devnull)   # a terminal whose echo cannot be set
    monkeypatch.setattr(getpass, "getpass", getpass_without_a_terminal)
    con = cli.Console(out=[].append, err=[].append, env={})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(cli.CommandFailed) as failed:
            cli._password(con)
    assert caught == []
    assert str(failed.value) == "no password given (set PAXCHAT_PASSWORD or run in a terminal)"


def test_at_a_terminal_the_banner_does_not_hide_the_password_prompt_of_user():
    """The banner's carriage return would start over a password prompt already written."""
    from twisted.internet.testing import StringTransport
    from paxchat.client.shell import ShellProtocol
    leader, follower = os.openpty()
    try:
        def make_shell(proto):
            shell = Shell(StubClient(), proto.write, proto.ask_secret, lambda: None)
            proto.run_first(lambda: shell.ask_password("Password for alice: "))   # as --user does
            return shell
        proto = ShellProtocol(make_shell, defer.Deferred(), stdin_fd=follower)
        transport = StringTransport()
        proto.makeConnection(transport)
    finally:
        os.close(leader)
        os.close(follower)
    shown = transport.value().decode()
    assert shown == "\rType 'help' for commands." + os.linesep + "Password for alice: "


def test_ctrl_c_at_the_prompt_ends_it_without_saying_the_connection_is_being_remade(monkeypatch):
    """Ctrl-C stops the reactor, which drops every connection; the prompt
    must not then say it lost its server and is looking for another."""
    import argparse
    import io
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from paxchat.client import interactive
    from paxchat.client.api import PaxchatClient
    from paxchat.client.targets import targets_from_addresses
    from .client_fakes import FakeNodes
    reactor = MemoryReactorClock()
    nodes = FakeNodes(reactor)

    def make_client(reactor, config, args, **kwargs):
        targets = targets_from_addresses(reactor, {1: ("127.0.0.1", 7101), 2: ("127.0.0.1", 7102)})
        return PaxchatClient(reactor, targets, **kwargs)

    class FakeStdio:
        @staticmethod
        def StandardIO(proto, reactor=None):
            proto.makeConnection(StringTransport())
    errors = io.StringIO()
    monkeypatch.setattr(cli, "make_client", make_client)
    monkeypatch.setattr(interactive, "stdio", FakeStdio)
    monkeypatch.setattr("sys.stderr", errors)
    args = argparse.Namespace(user=None, no_session_cache=True)
    with open(os.devnull) as stdin:                                  # not a terminal: notes on stderr
        monkeypatch.setattr("sys.stdin", stdin)
        interactive.run_interactive(reactor, None, args, cli.Console(env={}))
    reactor.advance(0)
    conn = nodes.accept()
    conn.handshake(node=1)
    assert "Connected to node 1." in errors.getvalue()
    for trigger, a, kw in reactor.triggers.get("before", {}).get("shutdown", []):   # Ctrl-C
        trigger(*a, **kw)
    conn.drop()                                                      # the reactor drops what is open
    reactor.advance(1)
    assert "reconnecting" not in errors.getvalue() and "Connection lost" not in errors.getvalue()
    assert len(reactor.tcpClients) == 1                              # no other node was tried


def test_ctrl_c_during_a_one_shot_command_gives_it_up_with_status_130(monkeypatch):
    """Not status 0 as if it were done: the send may or may not have been made."""
    from twisted.internet.testing import MemoryReactorClock
    pending = defer.Deferred()

    class Client(StubClient):
        def send_message(self, to, body):
            return pending                                  # the cluster does not answer

        def close(self):
            return defer.succeed(None)
    monkeypatch.setattr(cli, "_load_config", lambda path: None)
    monkeypatch.setattr(cli, "make_client", lambda reactor, config, args, **kw: Client({"login": {"session": "t"}}))
    reactor = MemoryReactorClock()
    con, out, err, _ = console(env={"PAXCHAT_PASSWORD": "pw-123456"})
    status = []
    cli.start(reactor, parse("--user", "alice", "--no-session-cache", "send", "bob", "hi"), con
              ).addBoth(status.append)
    assert status == []
    for trigger, a, kw in reactor.triggers.get("before", {}).get("shutdown", []):   # Ctrl-C
        trigger(*a, **kw)
    assert status == [130] and out == []
    assert err == ["paxchat: interrupted before the cluster answered;"
                   " a change asked for may or may not have been made."]


def test_at_a_terminal_a_message_that_arrives_while_the_prompt_waits_is_followed_by_the_prompt():
    """The message starts over the prompt's line; without a new prompt the user
    would type on a bare line, not knowing the prompt still waits."""
    from twisted.internet.testing import StringTransport
    from paxchat.client.api import Status
    from paxchat.client.shell import ShellProtocol
    client = StubClient({"list_accounts": {"accounts": ["bob"]}})
    client.username = "alice"
    leader, follower = os.openpty()
    try:
        proto = ShellProtocol(lambda p: Shell(client, p.write, p.ask_secret, lambda: None, note=p.note),
                              defer.Deferred(), stdin_fd=follower)
        transport = StringTransport()
        proto.makeConnection(transport)
        transport.clear()
        proto.shell.on_event({"event": "message", "message": dict(MSG, to="alice")})
        assert transport.value().decode().endswith("    there" + os.linesep + "alice> ")
        transport.clear()
        proto.shell.on_status(Status("connected", node=2))
        assert transport.value().decode() == "\rConnected to node 2." + os.linesep + "alice> "
        transport.clear()
        proto.dataReceived(b"list\n")               # a command's answer: one prompt, after it
        assert transport.value().decode() == "\rbob" + os.linesep + "alice> "
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.parametrize("name", ["create-account", "send", "read", "history", "list", "delete",
                                  "delete-account", "logout", "settings"])
def test_each_command_help_says_what_the_command_does(name, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([name, "--help"])
    shown = capsys.readouterr().out
    listed = next(line.split(None, 1)[1] for line in cli.build_parser().format_help().splitlines()
                  if line.strip().startswith(name + " "))
    assert f"{listed[0].upper()}{listed[1:].strip()}." in shown


def test_delete_help_says_what_an_id_is(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["delete", "--help"])
    assert "as read and history show it" in capsys.readouterr().out
