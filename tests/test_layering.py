"""The dependency rules of DESIGN.md, checked on the source itself.

paxos and state never import each other, the server, or a reactor; the
Paxos core and its messages touch no clock, randomness, socket or disk.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "paxchat"


def imported_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.ImportFrom) and node.level:
            # Relative imports stay inside the package; resolve one level.
            pkg = path.parent.relative_to(ROOT.parent).parts
            base = pkg[: len(pkg) - (node.level - 1)]
            yield ".".join(base + ((node.module,) if node.module else ()))


def sources(package):
    return sorted((ROOT / package).glob("*.py"))


@pytest.mark.parametrize("package,forbidden", [
    ("paxos", ("paxchat.state", "paxchat.server", "paxchat.client", "paxchat.node")),
    ("state", ("paxchat.paxos", "paxchat.server", "paxchat.client", "paxchat.node")),
])
def test_layers_do_not_reach_across(package, forbidden):
    for path in sources(package):
        for name in imported_modules(path):
            assert not name.startswith(forbidden), f"{path.name} imports {name}"
            assert name != "twisted.internet.reactor", f"{path.name} imports the global reactor"


PURE = ("twisted", "socket", "time", "random", "sqlite3", "threading", "asyncio", "os")


@pytest.mark.parametrize("module", ["core.py", "messages.py"])
def test_paxos_core_is_pure(module):
    path = ROOT / "paxos" / module
    if not path.exists():
        pytest.skip(f"paxos/{module} not written yet")
    for name in imported_modules(path):
        assert name.split(".")[0] not in PURE, f"paxos/{module} imports {name}"


def test_a_node_loads_the_web_server_only_when_it_serves_http():
    """twisted.web and the admin API cost every start-up ~30 ms: only for nodes that serve them."""
    import subprocess
    import sys
    code = ("import sys, paxchat.tap, paxchat.node, paxchat.metrics; "
            "print(sorted(m for m in sys.modules if m.startswith(('twisted.web', 'paxchat.admin',"
            " 'paxchat.httpsite'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=ROOT.parent, check=True).stdout
    assert out.strip() == "[]"
