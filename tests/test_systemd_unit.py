"""contrib/systemd/paxchat@.service: what it must say, and systemd's own check of it."""

import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from paxchat import tap

REPO = pathlib.Path(__file__).resolve().parent.parent
UNIT = REPO / "contrib" / "systemd" / "paxchat@.service"
TWISTD = "/opt/paxchat/bin/twistd"


def settings():
    """[(section, key, value)] in file order; systemd allows repeated keys."""
    section, found = None, []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(key, section="Service"):
    return [v for s, k, v in settings() if s == section and k == key]


def one(key, section="Service"):
    found = values(key, section)
    assert len(found) == 1, f"{key} appears {len(found)} times"
    return found[0]


def test_runs_one_node_per_instance_under_twistd():
    argv = shlex.split(one("ExecStart"))
    assert argv[:4] == [TWISTD, "--nodaemon", "--pidfile=", "paxchat"]
    assert argv[4:] == ["--config", "/etc/paxchat/cluster.ini", "--node", "%i"]


def test_exec_start_options_are_the_plugins(tmp_path):
    ini = tmp_path / "cluster.ini"
    ini.write_text("[cluster]\nclient_tls = off\n[node.1]\nclient = 127.0.0.1:7101\n"
                   "peer = 127.0.0.1:7201\n")
    argv = shlex.split(one("ExecStart"))[4:]
    argv = [str(ini) if a == "/etc/paxchat/cluster.ini" else "1" if a == "%i" else a for a in argv]
    options = tap.Options()
    options.parseOptions(argv)
    assert options["node"] == 1


def test_reload_is_sighup_which_the_node_takes_as_a_reload_of_cluster_ini():
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert callable(tap.reload_on_sighup)


def test_ready_and_restart_policy():
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("Restart") == "on-failure"
    assert one("KillSignal") == "SIGTERM"
    assert float(one("TimeoutStopSec")) >= 10
    assert float(one("WatchdogSec")) >= 10


def test_sandbox():
    assert one("User") == "paxchat"
    assert one("StateDirectory") == "paxchat"
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("PrivateTmp") == "yes"
    assert one("ProtectHome") == "yes"
    assert one("CapabilityBoundingSet") == ""
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert one("LimitNOFILE") == "65536"
    assert one("UMask") == "0077"


def test_log_format_is_chosen_in_the_unit():
    assert "PAXCHAT_LOG_FORMAT=text" in " ".join(values("Environment"))


def test_installs_into_multi_user():
    assert one("WantedBy", "Install") == "multi-user.target"
    assert one("After", "Unit") == "network-online.target"


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that ExecStart's program exists: point it at this venv's twistd.
    twistd = pathlib.Path(sys.executable).parent / "twistd"
    if not twistd.exists():
        pytest.skip(f"{twistd} is missing")
    unit = tmp_path / "paxchat@1.service"
    unit.write_text(UNIT.read_text().replace(TWISTD, str(twistd)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
