"""``python -m bench [names...] [--tiny]``: run the benchmarks and print their figures.

Names: writes, failover, catchup, connections, loginstorm, scans, apply, tlsmemory (default: all).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import shutil
import sys
import time

from . import procs
from .context import Context
from .etcd_cluster import EtcdUnavailable, ensure_etcd, etcd_version

BENCHMARKS = ["writes", "failover", "catchup", "connections", "loginstorm", "scans", "apply", "tlsmemory"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=BENCHMARKS + [[]], metavar="NAME",
                        help=f"benchmarks to run ({', '.join(BENCHMARKS)}; default: all)")
    parser.add_argument("--tiny", action="store_true", help="seconds, not minutes: proves it works")
    parser.add_argument("--no-etcd", action="store_true", help="paxchat only")
    parser.add_argument("--no-paxchat", action="store_true", help="etcd only (to check the peer)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install etcd-server when etcd is missing")
    parser.add_argument("--profile", choices=["py-spy", "pyinstrument"],
                        help="profile nodes during the write benchmark (installs the tool on demand)")
    parser.add_argument("--profile-clients", type=int, default=64,
                        help="with --profile py-spy: the client count to profile (default: %(default)s)")
    parser.add_argument("--clients", help="writes: only these client counts, e.g. 64 or 1,64")
    parser.add_argument("--workdir", help="where clusters keep their data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data, profiles)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    args.names = [n for n in args.names if n] or list(BENCHMARKS)
    return args


def main(argv=None):
    args = parse(argv)
    procs.raise_nofile()
    binary, reason, version = None, "--no-etcd given", None
    if not args.no_etcd:
        try:
            binary = ensure_etcd(install=not args.no_install)
            version = etcd_version(binary)
        except EtcdUnavailable as e:
            reason = str(e)
    ctx = Context(tiny=args.tiny, etcd_binary=binary, etcd_reason=reason, etcd_version=version,
                  base_dir=args.workdir, keep=args.keep or bool(args.workdir), profile=args.profile)
    ctx.profile_clients = args.profile_clients
    ctx.with_paxchat = not args.no_paxchat
    ctx.clients = [int(c) for c in args.clients.split(",")] if args.clients else None
    if args.profile:
        from . import profiling
        profiling.ensure_tool(args.profile)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "etcd": version or f"not measured ({reason})", "tiny": args.tiny, **procs.machine()}
    ctx.say(f"bench: {meta['date']}  nproc={meta.get('nproc')}  mem={meta.get('mem_gib')} GiB  "
            f"load={meta.get('loadavg', 0):.2f}  etcd={meta['etcd']}  work dir {ctx.base_dir}")

    from twisted.internet import reactor, task

    failures = []

    async def run_all(reactor):
        for name in args.names:
            module = importlib.import_module(f"bench.{name}")
            started = time.monotonic()
            ctx.say(f"bench: --- {name} ---")
            try:
                await module.run(reactor, ctx)
            except Exception as e:  # one benchmark failing must not hide the others
                import traceback
                traceback.print_exc()
                failures.append(name)
                ctx.say(f"bench: {name} FAILED: {type(e).__name__}: {e}")
            ctx.say(f"bench: {name} took {time.monotonic() - started:.1f}s")

    def entry(reactor):
        from twisted.internet import defer
        return defer.ensureDeferred(run_all(reactor))

    try:
        _react(entry)
    finally:
        if args.json:
            ctx.write_json(args.json, meta)
        if not ctx.keep:
            shutil.rmtree(ctx.base_dir, ignore_errors=True)
    if ctx.results:
        from .summary import markdown
        ctx.say("bench: summary\n" + markdown(ctx.results))
    from .load import PARSE_ERRORS
    if PARSE_ERRORS:
        ctx.say(f"bench: {len(PARSE_ERRORS)} HTTP answers could not be parsed; first: {PARSE_ERRORS[0]!r}")
    if failures:
        ctx.say(f"bench: failed: {', '.join(failures)}")
        return 1
    return 0


def _react(entry):
    """Run ``entry(reactor)`` to completion on the global reactor (we are the entry point)."""
    from twisted.internet import reactor
    outcome = []

    def go():
        d = entry(reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=True)
    if outcome and hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()


if __name__ == "__main__":
    sys.exit(main())
