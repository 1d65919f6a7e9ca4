"""Run the Paxos simulator: many seeds, or one seed replayed step by step.

    python -m tests.sim --seeds 100000 [--start 0] [--jobs N]
    python -m tests.sim --seed S --trace
"""

import argparse
import sys
import time

from .cluster import SimFailure, run_seed


def _one(seed):
    try:
        sim = run_seed(seed)
    except SimFailure as e:
        return seed, str(e), None
    except Exception as e:  # a crash of the replica or the simulator is a failure too
        return seed, f"seed {seed}: {type(e).__name__}: {e}", None
    return seed, None, sim.stats


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--seed", type=int, help="run just this seed")
    p.add_argument("--trace", action="store_true", help="print every step of --seed")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    a = p.parse_args(argv)

    if a.seed is not None:
        trace = print if a.trace else None
        try:
            sim = run_seed(a.seed, trace=trace)
        except SimFailure as e:
            print(f"FAIL {e}")
            return 1
        print(f"seed {a.seed} ok: n={sim.n} {sim.stats}")
        return 0

    seeds = range(a.start, a.start + a.seeds)
    t0 = time.monotonic()
    done = failed = 0
    first_fail = None
    totals = {}
    last = 0.0

    def progress(final=False):
        el = time.monotonic() - t0
        sys.stderr.write(f"\r{done}/{a.seeds} seeds, {failed} failed, {el:.0f}s, "
                         f"{done / el if el else 0:.1f} seeds/s" + ("\n" if final else ""))
        sys.stderr.flush()

    if a.jobs > 1:
        import multiprocessing
        pool = multiprocessing.Pool(a.jobs)
        results = pool.imap(_one, seeds, chunksize=4)
    else:
        pool = None
        results = map(_one, seeds)
    try:
        for seed, err, stats in results:
            done += 1
            if err:
                failed += 1
                print(f"\nFAIL {err}\n  replay: python -m tests.sim --seed {seed} --trace")
                if first_fail is None:
                    first_fail = seed
                if not a.keep_going:
                    break
            else:
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0) + v
            if time.monotonic() - last > 1:
                last = time.monotonic()
                progress()
    finally:
        if pool is not None:
            pool.terminate()
    progress(final=True)
    print(f"{done} seeds from {a.start} in {time.monotonic() - t0:.1f}s, {failed} failed; totals {totals}")
    if first_fail is not None:
        print(f"first failing seed: {first_fail}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
