"""The bcrypt worker: a child process that hashes and checks passwords for its node.

A login at bcrypt cost 12 takes ~0.3 s of CPU. In a thread of the node that
CPU is the node's own: where the kernel shares CPU between sessions
(autogroup scheduling, which applies to processes not placed in a cgroup of
their own, such as a node started from a shell) a storm of logins takes its
time from the node's share and chat latency doubles (docs/performance.md).
This process starts a session of its own and lowers its priority, so
hashes get the CPU the nodes leave: logins wait longer, chat does not.

The node writes one JSON object per line on stdin; answers come on stdout
in any order:

    {"id": 7, "op": "hash", "secret": "...", "cost": 12} -> {"id": 7, "ok": "$2b$12$..."}
    {"id": 8, "op": "check", "secret": "...", "hash": "$2b$..."} -> {"id": 8, "ok": true}
    a request it cannot do -> {"id": 8, "error": "..."}

The secret is the node's prehash of the password (``passwords.prehash``),
never the password. The worker exits when its stdin closes (the node
stopped or died), dropping requests not yet started. It imports only the
standard library and bcrypt, so it starts in a few tens of milliseconds.
"""

import argparse
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import bcrypt

# How much lower than its node the worker runs (a nice increment).
NICE = 10


def make_hash(secret: bytes, cost: int) -> str:
    """A new bcrypt hash of ``secret`` (at most 72 bytes, no NUL)."""
    return bcrypt.hashpw(secret, bcrypt.gensalt(cost)).decode("ascii")


def check_hash(secret: bytes, hashed: str) -> bool:
    """Whether ``secret`` matches ``hashed``; a hash that cannot be read matches nothing."""
    try:
        return bcrypt.checkpw(secret, hashed.encode("ascii"))
    except (ValueError, UnicodeEncodeError, AttributeError):
        return False


def serve(request: dict):
    """The answer to one request (raises on a request it cannot do)."""
    op = request.get("op")
    secret = request["secret"].encode("ascii")
    if op == "hash":
        return make_hash(secret, int(request["cost"]))
    if op == "check":
        return check_hash(secret, request["hash"])
    raise ValueError(f"unknown op {op!r}")


def lower_priority(nice):
    """A session of its own (its own autogroup, where there are autogroups), ``nice`` lower."""
    try:
        os.setsid()
    except OSError:
        pass                                # already a session leader
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass                                # no autogroup scheduling here
    try:
        os.nice(nice)
    except OSError:
        pass


def run(stdin, stdout, threads):
    """Answer requests from ``stdin`` until it closes, ``threads`` at a time."""
    lock = threading.Lock()

    def answer(reply):
        line = (json.dumps(reply) + "\n").encode("ascii")
        with lock:
            try:
                stdout.write(line)
                stdout.flush()
            except (BrokenPipeError, ValueError):
                pass                        # the node is gone

    def work(request_id, request):
        try:
            answer({"id": request_id, "ok": serve(request)})
        except Exception as e:
            answer({"id": request_id, "error": f"{type(e).__name__}: {e}"})

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bcrypt")
    try:
        for line in stdin:
            try:
                request = json.loads(line)
                request_id = request["id"]
            except (ValueError, TypeError, KeyError):
                answer({"id": None, "error": "malformed request"})
                continue
            pool.submit(work, request_id, request)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nice", type=int, default=NICE)
    args = parser.parse_args(argv)
    lower_priority(args.nice)
    run(sys.stdin.buffer, sys.stdout.buffer, max(1, args.threads))


if __name__ == "__main__":
    main()
