"""``python -m bench.profiled_node --out FILE -- <twistd args>``: one node under pyinstrument.

The profile is written when the reactor has shut down (SIGTERM from the
harness), so stop the cluster gracefully to get it: twistd then re-raises
the signal and the process ends without returning.
"""

import argparse
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    # The node command is [python, -c, TWISTD, ...twistd args]: keep what follows the -c code.
    if rest[:1] == ["-c"]:
        rest = rest[2:]
    from pyinstrument import Profiler
    from twisted.internet import reactor  # the default one, which twistd would install too
    from twisted.scripts.twistd import run
    profiler = Profiler(interval=0.001)

    def write_profile():
        if profiler.is_running:
            profiler.stop()
            with open(args.out, "w") as f:
                f.write(profiler.output_text(unicode=True, color=False, show_all=False))

    reactor.addSystemEventTrigger("after", "shutdown", write_profile)
    sys.argv = ["twistd"] + rest
    profiler.start()
    try:
        run()
    finally:
        write_profile()


if __name__ == "__main__":
    main()
