"""The twistd plugin: listed by twistd, lazy, robust to a bad plugin cache, clean errors."""

import gc
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
from twisted.application.service import IService
from twisted.python import usage

from paxchat import tap

REPO = pathlib.Path(__file__).resolve().parent.parent
PLUGIN = REPO / "twisted" / "plugins" / "paxchat_plugin.py"

INI = """\
[cluster]
data_dir = data
tls_dir = certs
client_tls = off
bcrypt_cost = 4
[node.1]
client = 127.0.0.1:7101
peer = 127.0.0.1:7201
"""


def run_twistd(args, cwd, plugin_dir=None, timeout=60):
    """Run twistd in a fresh interpreter; with ``plugin_dir``, plugins come from there only.

    The repository's own twisted/plugins is hidden from twisted.plugins so
    that the copy in ``plugin_dir`` (with whatever cache sits beside it) is
    the one twistd must find; the paxchat package stays importable.
    """
    code = textwrap.dedent(f"""
        import os, sys
        repo, plugins = {str(REPO)!r}, {str(plugin_dir) if plugin_dir else None!r}
        if plugins:
            sys.path = [p for p in sys.path if os.path.realpath(p or '.') != repo]
            sys.path.insert(0, plugins)
            import twisted.plugins
            sys.path.append(repo)
        from twisted.scripts.twistd import run
        sys.argv = ['twistd'] + {list(args)!r}
        run()
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_no_init_in_twisted_plugins():
    assert PLUGIN.exists()
    assert not (PLUGIN.parent / "__init__.py").exists()
    assert not (PLUGIN.parent.parent / "__init__.py").exists()


def test_twistd_help_lists_paxchat(tmp_path):
    result = run_twistd(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "paxchat" in result.stdout


def test_plugin_is_lazy(tmp_path):
    code = ("import sys\nfrom twisted.plugins import paxchat_plugin\n"
            "assert paxchat_plugin.paxchat.tapname == 'paxchat'\n"
            "assert 'paxchat.tap' not in sys.modules, 'paxchat.tap imported'\n"
            "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def corrupt(cache):
    cache.write_bytes(b"\x80\x04 this is not a pickle")


def unwritable(cache):
    # Root ignores file modes, so make the cache a directory: reading and
    # rewriting it both fail.
    cache.mkdir()


def stale(cache):
    # A cache written for an older version of the plugin file, with another
    # plugin that no longer exists.
    plugin = cache.parent / "paxchat_plugin.py"
    gone = cache.parent / "gone_plugin.py"
    gone.write_text(plugin.read_text().replace('"paxchat",', '"gone",', 1))
    text = plugin.read_text()
    plugin.write_text(text.replace("A paxchat node", "An old paxchat node"))
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); from twisted.plugin import getPlugins, "
         "IPlugin; import twisted.plugins as p; list(getPlugins(IPlugin, p))",
         str(cache.parent.parent.parent)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert cache.is_file()
    gone.unlink()
    plugin.write_text(text)
    later = cache.stat().st_mtime + 10
    os.utime(plugin, (later, later))


@pytest.mark.parametrize("spoil", [corrupt, unwritable, stale])
def test_bad_plugin_cache_does_not_break_twistd(tmp_path, spoil):
    plugin_dir = tmp_path / "path"
    plugins = plugin_dir / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    shutil.copy(PLUGIN, plugins)
    spoil(plugins / "dropin.cache")

    result = run_twistd(["--help"], cwd=tmp_path, plugin_dir=plugin_dir)
    assert result.returncode == 0, result.stderr
    assert "A paxchat node" in result.stdout and "old paxchat" not in result.stdout

    # The plugin's service maker still reaches paxchat.tap: a config error, not a traceback.
    result = run_twistd(["-n", "--pidfile=", "paxchat", "--config", "missing.ini", "--node", "1"],
                        cwd=tmp_path, plugin_dir=plugin_dir)
    assert result.returncode == 1
    assert "missing.ini: no such file" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_twistd_config_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "cluster.ini").write_text(INI.replace("127.0.0.1:7201", "127.0.0.1:99999"))
    result = run_twistd(["-n", "--pidfile=", "paxchat", "--node", "1"], cwd=tmp_path)
    assert result.returncode == 1
    assert (result.stdout, result.stderr) == (
        "", "paxchat: cluster.ini: [node.1] peer: '127.0.0.1:99999' is not a valid host:port\n")
    assert not (tmp_path / "twistd.pid").exists()


@pytest.mark.parametrize("ini, args, line", [
    (INI.replace("bcrypt_cost = 4", "bcrypt_cost = 3"), ["--node", "1"],
     "cluster.ini: [cluster] bcrypt_cost: '3' must be at least 4"),
    (INI, ["--node", "one"],
     "Parameter type enforcement failed: invalid literal for int() with base 10: 'one'"),
    (INI, ["--node", "1", "--log-level", "bogus"],
     "unknown log level 'bogus' (use one of debug, info, warn, error, critical; warning is warn)"),
    (INI, ["--node", "1", "--bogus"], "option --bogus not recognized"),
], ids=["config", "node", "level", "option"])
def test_twistd_prints_a_bad_config_or_option_as_one_line_without_its_usage(
        tmp_path, ini, args, line):
    (tmp_path / "cluster.ini").write_text(ini)
    result = run_twistd(["-n", "--pidfile=", "paxchat", *args], cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"paxchat: {line}\n")


def two_node_cluster(tmp_path):
    """A cluster.ini of two nodes on free ports with their certificates: node 1 has a peer."""
    from paxchat import config as configmod
    from paxchat import tls
    from paxchat.devcluster import write_local_config
    cfg = configmod.load(write_local_config(tmp_path, nodes=2, client_tls="off", bcrypt_cost=4))
    tls.make_cluster_certs(cfg)
    return cfg


def taken(address):
    """A socket listening on ``address``, as a node already running there would."""
    import socket
    s = socket.socket()
    s.bind((address.host, address.port))
    s.listen()
    return s


def said_by_paxchat(result):
    """The lines of a twistd run besides twistd's own start and stop lines; what went to
    stderr once twistd logs (it logs stderr) without its log prefix."""
    lines = (result.stdout + result.stderr).splitlines()
    return [line.split(" [stderr#error] ", 1)[-1] for line in lines
            if "[twisted.scripts._twistd_unix.UnixAppLogger#info]" not in line]


@pytest.mark.parametrize("level", [[], ["--log-level", "critical"]])
def test_a_taken_peer_port_stops_the_node_in_one_line(tmp_path, level):
    cfg = two_node_cluster(tmp_path)
    peer = cfg.node(1).peer
    with taken(peer):
        result = run_twistd(["-n", "--pidfile=", "paxchat", "--node", "1", *level], cwd=tmp_path)
    assert result.returncode == 1
    said = said_by_paxchat(result)
    assert said[-1:] == [
        f"paxchat node 1 could not start: Couldn't listen on {peer}: "
        "[Errno 98] Address already in use."]
    # Before it: at most the info line of the log it recovered, before any port was bound.
    assert all("[paxchat.paxos.store#info] recovered 0 records" in line for line in said[:-1])
    assert len(said) == (1 if level else 2)
    assert result.stderr.startswith("paxchat node 1 could not start")   # not a log line


def test_a_node_started_twice_is_told_its_data_directory_is_in_use_before_its_ports(tmp_path):
    import fcntl
    cfg = two_node_cluster(tmp_path)
    paxos = cfg.node_data_dir(1) / "paxos"
    paxos.mkdir(parents=True)
    # The first node holds its log's lock and its ports.
    fd = os.open(paxos / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with taken(cfg.node(1).peer), taken(cfg.node(1).client):
            result = run_twistd(["-n", "--pidfile=", "paxchat", "--node", "1"], cwd=tmp_path)
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert said_by_paxchat(result) == [
        f"paxchat node 1 could not start: {paxos} is in use by another process (a node "
        "started twice, or two nodes with one data directory); refusing to open it"]


def test_a_damaged_lineage_stamp_stops_the_node_in_one_line(tmp_path):
    (tmp_path / "cluster.ini").write_text(INI)
    data = tmp_path / "data" / "node-1"
    data.mkdir(parents=True, mode=0o700)
    (data / "lineage").write_text("not a digest\n")
    result = run_twistd(["-n", "--pidfile=", "paxchat", "--node", "1"], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"paxchat node 1 could not start: {data / 'lineage'} is damaged" in out
    assert "Traceback" not in out
    assert sorted(p.name for p in data.iterdir()) == ["lineage"]      # nothing else was made


def damage_the_log(paxos):
    """A Paxos log whose second record of three is damaged (a sound one follows it):
    (its segment, the damaged record's offset)."""
    from paxchat.paxos.store import rewrite_log
    rewrite_log(paxos, [b"one" * 10, b"two" * 10, b"three" * 10])
    [segment] = paxos.glob("wal-*.log")
    data = bytearray(segment.read_bytes())
    payload = data.index(b"two" * 10)
    data[payload + 3] ^= 0x01
    segment.write_bytes(bytes(data))
    return segment, payload - 16         # a record's header is 16 bytes


def test_a_damaged_log_stops_the_node_before_it_serves_or_says_ready(tmp_path, monkeypatch):
    """systemd must not hear READY=1 from a node that is about to refuse its data: it
    would report the start a success and restart the unit in a loop."""
    import socket
    cfg = two_node_cluster(tmp_path)
    segment, offset = damage_the_log(cfg.node_data_dir(1) / "paxos")
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify.sock"))
    systemd.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    try:
        result = run_twistd(["-n", "--pidfile=", "paxchat", "--node", "1"], cwd=tmp_path)
        told = []
        while True:
            try:
                told.append(systemd.recv(4096))
            except BlockingIOError:
                break
    finally:
        systemd.close()
    assert result.returncode == 1
    assert not any(m.startswith(b"READY=1") for m in told), told
    out = result.stdout + result.stderr
    assert "serving clients" not in out and "Traceback" not in out
    admin = f"paxchat-admin --config {cfg.path}"
    assert said_by_paxchat(result)[-1] == (
        f"paxchat node 1 could not start: {segment}: damaged record at offset {offset} followed by"
        f" sound records; refusing to start. Move {cfg.node_data_dir(1)} aside and, with every"
        f" other node up and linked (`{admin} status`), run `{admin} rebuild --node 1` as the"
        " node's user, then start the node: it rebuilds from the others (docs/operations.md,"
        ' "A node whose disk was lost")')


def node_1_state(tmp_path):
    """A one-node cluster.ini, and node 1's data directory and state database (open)."""
    from paxchat.state.chat import ChatState
    (tmp_path / "cluster.ini").write_text(INI)
    data = tmp_path / "data" / "node-1"
    data.mkdir(parents=True, mode=0o700)
    return data, ChatState.open(str(data / "state.sqlite3"))


def test_a_state_of_a_newer_apply_version_stops_the_node_in_one_line(tmp_path):
    from paxchat.state.chat import APPLY_VERSION
    data, state = node_1_state(tmp_path)
    with state.kv.transaction():
        state.kv.put("#version", str(APPLY_VERSION + 1).encode())
    state.close()
    result = run_twistd(["-n", "--pidfile=", "paxchat", "--node", "1"], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1
    assert (f"paxchat node 1 could not start: the cluster's apply version is {APPLY_VERSION + 1}"
            f" and this build knows versions up to {APPLY_VERSION}") in out
    assert "Traceback" not in out


def test_a_damaged_state_database_stops_the_node_in_one_line_saying_what_to_do(tmp_path):
    from .test_chat_state import damage_the_second_half
    data, state = node_1_state(tmp_path)
    with state.kv.transaction():
        for i in range(2000):
            state.kv.put(f"k{i:05d}", b"v" * 200)
    state.close()
    damage_the_second_half(data / "state.sqlite3")
    result = run_twistd(["-n", "--pidfile=", "paxchat", "--node", "1"], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1
    assert (f"paxchat node 1 could not start: state database {data / 'state.sqlite3'} is damaged: "
            "On tree page") in out
    assert f"Move {data} aside" in out and "restore BACKUP --node 1" in out   # one node: no rebuild
    assert "Traceback" not in out


# -- Options, in process ---------------------------------------------------

def write_ini(tmp_path, text=INI):
    path = tmp_path / "cluster.ini"
    path.write_text(text)
    return path


def test_options_need_a_node(tmp_path):
    with pytest.raises(usage.UsageError, match="--node is required"):
        tap.Options().parseOptions(["--config", str(write_ini(tmp_path))])


def test_options_node_must_be_an_integer(tmp_path):
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["--config", str(write_ini(tmp_path)), "--node", "one"])


def test_options_unknown_node(tmp_path):
    with pytest.raises(usage.UsageError) as info:
        tap.Options().parseOptions(["--config", str(write_ini(tmp_path)), "--node", "4"])
    assert str(info.value).endswith("no [node.4] section for --node 4 (nodes are 1)")


def test_options_default_config_is_cluster_ini(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_ini(tmp_path)
    options = tap.Options()
    options.parseOptions(["--node", "1"])
    assert options["config"] == "cluster.ini"
    assert options["cluster"].node(1).client.port == 7101


def test_options_missing_certificates_with_client_tls(tmp_path):
    path = write_ini(tmp_path, INI.replace("client_tls = off", "client_tls = on"))
    with pytest.raises(usage.UsageError) as info:
        tap.Options().parseOptions(["--config", str(path), "--node", "1"])
    message = str(info.value)
    assert str(tmp_path / "certs" / "ca.pem") in message and "paxchat-certs" in message
    assert "\n" not in message


def test_make_service_is_a_service(tmp_path, monkeypatch):
    pytest.importorskip("paxchat.node", exc_type=ImportError)
    from twisted.internet import reactor
    import paxchat.clocks
    options = tap.Options()
    options.parseOptions(["--config", str(write_ini(tmp_path)), "--node", "1"])
    before = sys.getswitchinterval()
    moved = []
    monkeypatch.setattr(paxchat.clocks, "run_timers_on_monotonic_time", moved.append)
    gc.unfreeze()
    try:
        svc = tap.makeService(options)
        # The node's timers run on monotonic time (paxchat/clocks.py).
        assert moved == [reactor]
        # The reactor thread gets the GIL back quickly from the apply and disk threads.
        assert sys.getswitchinterval() == pytest.approx(tap.GIL_SWITCH_INTERVAL)
        # Start-up's objects are out of the collector's way.
        assert gc.get_freeze_count() > 0
    finally:
        sys.setswitchinterval(before)
        gc.unfreeze()
    assert IService.providedBy(svc)
    assert svc.node.node_id == 1
    assert not svc.running


def test_a_daemon_whose_stderr_goes_nowhere_logs_why_it_cannot_start(tmp_path):
    from twisted.logger import globalLogPublisher
    from paxchat.tap import say_start_failure
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        with open(os.devnull, "w") as void:
            say_start_failure("paxchat node 1 could not start: nowhere", void)
        with open(tmp_path / "stderr", "w") as seen:
            say_start_failure("paxchat node 1 could not start: on stderr", seen)
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e["text"] for e in events if e.get("log_format") == "{text}"]
    assert logged == ["paxchat node 1 could not start: nowhere"]           # said once, where seen
    assert (tmp_path / "stderr").read_text() == "paxchat node 1 could not start: on stderr\n"
