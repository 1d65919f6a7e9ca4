"""cluster.ini parsing: the shipped file loads, every mistake is one clear line."""

import os
import pathlib

import pytest

from paxchat import config
from paxchat.config import Address, ConfigError
from paxchat.server.settings import RateLimit, ServerSettings

REPO = pathlib.Path(__file__).resolve().parent.parent

GOOD = """\
[cluster]
data_dir = state
tls_dir = tls
client_tls = off
heartbeat_interval = 0.05
election_timeout_min = 0.3
election_timeout_max = 0.6
max_clock_drift = 0.1
request_timeout = 2
bcrypt_cost = 4
session_ttl = 60
writes_per_connection = 50
connections_per_address = 2.5

[node.2]
client = 127.0.0.1:7102
peer = 127.0.0.1:7202

[node.1]
client = localhost:7101
peer = [::1]:7201
metrics = 127.0.0.1:7301
"""


def write(tmp_path, text, name="cluster.ini"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "cluster.ini") + ": ")
    return message


def replace(old, new):
    assert old in GOOD
    return GOOD.replace(old, new)


def test_shipped_cluster_ini_loads():
    cfg = config.load(REPO / "cluster.ini")
    assert list(cfg.nodes) == [1, 2, 3, 4, 5]
    assert cfg.client_tls is True
    assert cfg.bcrypt_cost == 12
    assert cfg.data_dir == REPO / "data"
    assert cfg.tls_dir == REPO / "certs"
    assert cfg.node(3).client == Address("127.0.0.1", 7103)
    assert cfg.node(3).peer == Address("127.0.0.1", 7203)
    assert cfg.quorum == 3


def test_values_paths_and_node_order(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.path == tmp_path / "cluster.ini"
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.tls_dir == tmp_path / "tls"
    assert cfg.client_tls is False
    assert (cfg.heartbeat_interval, cfg.election_timeout_min, cfg.election_timeout_max) == (0.05, 0.3, 0.6)
    assert cfg.request_timeout == 2.0 and cfg.bcrypt_cost == 4 and cfg.session_ttl == 60
    assert (cfg.writes_per_connection, cfg.writes_per_account) == (50, 400)
    settings = ServerSettings.from_config(cfg, 1)
    assert settings.writes_per_connection == RateLimit(rate=50, burst=125)
    assert settings.writes_per_account == RateLimit(rate=400, burst=1000)
    assert settings.connections_per_address == RateLimit(rate=2.5, burst=25)
    assert ServerSettings(node_id=1).connections_per_address == RateLimit(rate=20, burst=200)
    assert list(cfg.nodes) == [1, 2]
    assert cfg.node(1).client == Address("localhost", 7101)
    assert cfg.node(1).peer == Address("::1", 7201)
    assert str(cfg.node(1).peer) == "[::1]:7201"
    assert cfg.node(1).metrics == Address("127.0.0.1", 7301)
    assert cfg.node(2).metrics is None
    assert cfg.ca_path == tmp_path / "tls" / "ca.pem"
    assert cfg.node_cert_path(2) == tmp_path / "tls" / "node-2.pem"
    assert cfg.node_key_path(2) == tmp_path / "tls" / "node-2.key"
    assert cfg.node_data_dir(2) == tmp_path / "state" / "node-2"
    assert [n.id for n in cfg.peers_of(1)] == [2]


def test_relative_paths_resolve_against_the_ini_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    path = write(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = config.load(os.path.relpath(path))
    assert cfg.data_dir == tmp_path / "state"


def test_inline_comments(tmp_path):
    cfg = config.load(write(tmp_path, replace("data_dir = state", "data_dir = state   ; per node")
                            .replace("client = 127.0.0.1:7102", "client = 127.0.0.1:7102  # clients")))
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.node(2).client == Address("127.0.0.1", 7102)


def test_defaults(tmp_path):
    cfg = config.load(write(tmp_path, "[cluster]\n[node.1]\nclient = 127.0.0.1:1\npeer = 127.0.0.1:2\n"))
    assert cfg.bcrypt_cost == 12
    assert cfg.client_tls is True
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.tls_dir == tmp_path / "certs"
    assert cfg.election_timeout_min <= cfg.election_timeout_max


def test_config_is_frozen(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    with pytest.raises(AttributeError):
        cfg.bcrypt_cost = 5
    with pytest.raises(TypeError):
        cfg.nodes[3] = cfg.nodes[1]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.ini")
    assert str(info.value) == f"{tmp_path / 'nope.ini'}: no such file"


def test_error_names_file_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, GOOD.replace("127.0.0.1:7102", "127.0.0.1:99999"))
    with pytest.raises(ConfigError) as info:
        config.load("cluster.ini")
    assert str(info.value) == "cluster.ini: [node.2] client: '127.0.0.1:99999' is not a valid host:port"
    assert (info.value.section, info.value.key) == ("node.2", "client")


def test_missing_cluster_section(tmp_path):
    text = GOOD.split("[node.2]")[1]
    assert "[cluster]: missing section" in error_of(tmp_path, "[node.2]" + text)


def test_no_nodes(tmp_path):
    assert "no [node.N] sections" in error_of(tmp_path, "[cluster]\nbcrypt_cost = 4\n")


@pytest.mark.parametrize("bad", [
    "127.0.0.1", "127.0.0.1:", ":7102", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x",
    "::1:7102", "[::1:7102", "[nothost]:7102", "999.1.1.1:7102", "bad host:7102", "-x:7102",
])
def test_bad_address(tmp_path, bad):
    message = error_of(tmp_path, replace("127.0.0.1:7102", bad))
    assert message.endswith(f"[node.2] client: {bad!r} is not a valid host:port")


def test_duplicate_address(tmp_path):
    message = error_of(tmp_path, replace("127.0.0.1:7202", "127.0.0.1:7102"))
    assert message.endswith("[node.2] peer: '127.0.0.1:7102' is already used by [node.2] client")


def test_duplicate_node_section(tmp_path):
    message = error_of(tmp_path, GOOD + "\n[node.2]\nclient = 127.0.0.1:1\npeer = 127.0.0.1:2\n")
    assert "[node.2]" in message and "twice" in message


def test_same_node_id_spelled_twice(tmp_path):
    message = error_of(tmp_path, GOOD + "\n[node.02]\nclient = 127.0.0.1:1\npeer = 127.0.0.1:2\n")
    assert "[node.02]" in message and "node 2 appears twice" in message


def test_duplicate_key(tmp_path):
    message = error_of(tmp_path, replace("bcrypt_cost = 4\n", "bcrypt_cost = 4\nbcrypt_cost = 5\n"))
    assert "[cluster] bcrypt_cost: set twice" in message


def test_missing_node_key(tmp_path):
    message = error_of(tmp_path, replace("peer = 127.0.0.1:7202\n", ""))
    assert message.endswith("[node.2] peer: missing key")


def test_unknown_node(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    with pytest.raises(ConfigError) as info:
        cfg.node(3)
    assert str(info.value) == f"{tmp_path / 'cluster.ini'}: no [node.3] section for --node 3 (nodes are 1, 2)"
    with pytest.raises(ConfigError):
        cfg.node_data_dir(3)


@pytest.mark.parametrize("section,key", [("cluster", "bcrypt_kost"), ("node.1", "clients")])
def test_unknown_key(tmp_path, section, key):
    text = replace(f"[{section}]\n", f"[{section}]\n{key} = 1\n")
    assert f"[{section}] {key}: unknown key" in error_of(tmp_path, text)


@pytest.mark.parametrize("section", ["nodes.1", "node.x", "node.0", "node.-1", "clusters"])
def test_unknown_section(tmp_path, section):
    assert f"[{section}]: unknown section" in error_of(tmp_path, GOOD + f"\n[{section}]\n")


@pytest.mark.parametrize("key,value,says", [
    ("bcrypt_cost", "twelve", "'twelve' is not a valid integer"),
    ("bcrypt_cost", "3", "must be at least 4"),
    ("bcrypt_cost", "32", "must be at most 31"),
    ("bcrypt_cost", "12.5", "not a valid integer"),
    ("request_timeout", "soon", "'soon' is not a valid number"),
    ("request_timeout", "0", "must be above 0"),
    ("request_timeout", "nan", "not a finite number"),
    ("session_ttl", "-1", "must be above 0"),
    ("writes_per_connection", "0", "must be above 0"),
    ("connections_per_address", "-1", "must be above 0"),
    ("connections_per_address", "many", "'many' is not a valid number"),
    ("client_tls", "maybe", "'maybe' is not a valid boolean"),
    ("max_clock_drift", "0.6", "must be at most 0.5"),
    ("max_clock_drift", "-0.1", "must be at least 0"),
])
def test_bad_value(tmp_path, key, value, says):
    text = "\n".join(
        f"{key} = {value}" if line.startswith(f"{key} =") else line for line in GOOD.splitlines()
    )
    message = error_of(tmp_path, text)
    assert f"[cluster] {key}: " in message and says in message


@pytest.mark.parametrize("value,expected", [("on", True), ("yes", True), ("1", True), ("off", False),
                                            ("FALSE", False), ("no", False)])
def test_booleans(tmp_path, value, expected):
    cfg = config.load(write(tmp_path, replace("client_tls = off", f"client_tls = {value}")))
    assert cfg.client_tls is expected


def test_election_timeout_min_above_max(tmp_path):
    message = error_of(tmp_path, replace("election_timeout_max = 0.6", "election_timeout_max = 0.2"))
    assert "[cluster] election_timeout_min: 0.3 is above election_timeout_max 0.2" in message


def test_heartbeat_not_below_election_timeout(tmp_path):
    message = error_of(tmp_path, replace("heartbeat_interval = 0.05", "heartbeat_interval = 0.3"))
    assert "[cluster] heartbeat_interval: 0.3 leaves no leader lease" in message


def test_clock_drift_can_eat_the_lease(tmp_path):
    # 0.3 * 0.6 / 1.4 = 0.129 > 0.05 leaves a lease; 0.3 * 0.5 / 1.5 = 0.1 with a 0.15 heartbeat does not.
    assert config.load(write(tmp_path, replace("max_clock_drift = 0.1", "max_clock_drift = 0.4")))
    text = replace("max_clock_drift = 0.1", "max_clock_drift = 0.5").replace(
        "heartbeat_interval = 0.05", "heartbeat_interval = 0.15")
    assert "[cluster] heartbeat_interval: 0.15 leaves no leader lease" in error_of(tmp_path, text)


def test_lease_duration_is_derived(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.lease_duration == pytest.approx(0.3 * 0.9 / 1.1 - 0.05)
    assert 0 < cfg.lease_duration < cfg.election_timeout_min


@pytest.mark.parametrize("text,says", [
    ("bcrypt_cost = 4\n[cluster]\n", "before the first [section]"),
    ("[cluster]\nthis is not a key value line\n", "cannot parse"),
])
def test_syntax_errors(tmp_path, text, says):
    assert says in error_of(tmp_path, text)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert "is a directory" in str(info.value)


def test_a_reload_takes_other_nodes_addresses_and_nothing_else(tmp_path):
    old = config.load(write(tmp_path, GOOD))

    def why(text):
        return config.what_a_reload_cannot_take(old, config.load(write(tmp_path, text)), 1)
    assert why(GOOD) is None
    assert why(replace("client = 127.0.0.1:7102\npeer = 127.0.0.1:7202",
                       "client = 10.0.0.9:7102\npeer = 10.0.0.9:7202\nadmin = 10.0.0.9:7302")) is None
    assert why(replace("client = localhost:7101", "client = localhost:7111")) == (
        "the addresses of this node, node 1, changed")
    assert why(replace("bcrypt_cost = 4", "bcrypt_cost = 5")) == "[cluster] bcrypt_cost changed"
    assert why(replace("session_ttl = 60\nwrites_per_connection = 50",
                       "session_ttl = 61\nwrites_per_connection = 51")) == (
        "[cluster] session_ttl, writes_per_connection changes")
    assert why(GOOD + "[node.3]\nclient = 127.0.0.1:7103\npeer = 127.0.0.1:7203\n").startswith(
        "it lists other node ids")
