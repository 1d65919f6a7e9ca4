"""Make docs/screenshot.png: the desktop app under Xvfb, talking to a real one-node cluster.

    .venv/bin/python tools/gui_screenshot.py [docs/screenshot.png]

Needs Xvfb and xwd (apt-get install xvfb x11-apps). Everything it starts
(the node, the X server) lives in a temporary directory and is stopped at the end.
"""

import os
import socket
import sys
import tempfile
import tkinter as tk
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402

from paxchat import tls  # noqa: E402
from paxchat.client import PaxchatClient  # noqa: E402
from paxchat.client.failover import FailoverPolicy  # noqa: E402
from paxchat.client.gui import ChatApp, client_maker  # noqa: E402
from paxchat.config import load  # noqa: E402
from paxchat.node import NodeService  # noqa: E402
from tests.xvfb import Xvfb, on_screen  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@defer.inlineCallbacks
def until(reactor, condition, what, timeout=10.0):
    """Poll ``condition()`` on the reactor until it holds; give up after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        yield task.deferLater(reactor, 0.02, lambda: None)


@defer.inlineCallbacks
def make(reactor, out, workdir):
    ini = Path(workdir) / "cluster.ini"
    ini.write_text(f"[cluster]\nclient_tls = on\nbcrypt_cost = 4\n[node.1]\n"
                   f"client = 127.0.0.1:{free_port()}\npeer = 127.0.0.1:{free_port()}\n")
    config = load(ini)
    tls.make_cluster_certs(config)
    node = NodeService(config, 1, reactor)
    node.startService()
    clients = {}
    try:
        for name in ("alice", "bob", "carol", "dave", "erin"):
            c = clients[name] = PaxchatClient.from_config(reactor, config, policy=FailoverPolicy(deadline=5))
            yield c.create_account(name, f"{name}-password")
            yield c.login(name, f"{name}-password")
        alice, bob, carol, dave = (clients[n] for n in ("alice", "bob", "carol", "dave"))
        lunch = yield dave.send_message("alice", "Lunch on Friday?")
        yield alice.mark_read([lunch["message_id"]])
        yield alice.send_message("dave", "Sure, 12:30 at the usual place.")
        yield alice.send_message("bob", "Morning! Did the cluster survive the night?")
        yield bob.send_message("alice", "It did. Node 3 was restarted twice and nobody noticed.")
        yield bob.send_message("alice", "Failover took about a second both times.")
        yield alice.send_message("bob", "Nice. And no duplicates after the retries?")
        yield bob.read_messages()          # so her newest message to him shows "Read"
        yield bob.send_message("alice", "None: every retry carries the same client_msg_id, "
                                        "so the log applies it once.")
        yield carol.send_message("alice", "Are you joining the design review?")
        yield carol.send_message("alice", "We start at 3.")
        with Xvfb(1000, 680) as x:
            from twisted.internet import tksupport
            root = tk.Tk(screenName=x.display, className="paxchat")
            tksupport.install(root)
            app = ChatApp(root, reactor, client_maker(reactor, str(ini)))
            model = app.model
            yield until(reactor, lambda: model.status_level == "ok", "the window to connect")
            app.user_entry.insert(0, "alice")
            app.password_entry.insert(0, "alice-password")
            yield app.controller.log_in("alice", "alice-password")
            app.open_conversation("bob")     # as a click does: the cursor goes to the compose box
            yield until(reactor, lambda: model.conversation("bob").loaded_once, "the conversation with bob")
            yield bob.send_message("alice", "Ship it?")
            yield until(reactor, lambda: any(m.get("body") == "Ship it?"
                                             for m in model.conversation("bob").messages.values()), "bob's message")
            app.compose.insert("1.0", "Ship it! 🙂".replace("🙂", ""))
            app.compose.configure(insertofftime=0)     # the cursor shows, not blinked off
            yield until(reactor, lambda: not app.coalescer.pending and root.focus_get() is app.compose,
                        "the window drawn")
            on_screen(root)
            x.screenshot(out)
            print(f"wrote {out}")
            yield app.close()
            tksupport.uninstall()
            root.destroy()
    finally:
        for c in clients.values():
            yield c.close()
        yield node.stopService()


def main():
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "screenshot.png"))
    with tempfile.TemporaryDirectory() as workdir:
        task.react(lambda reactor: make(reactor, out, workdir))


if __name__ == "__main__":
    main()
