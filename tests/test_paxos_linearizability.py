"""The simulator's linearizability checker accepts good histories and rejects bad ones."""

import itertools
import random

import pytest

from tests.sim.linearizability import (
    AppendListModel, Op, OrderedAppendModel, RegisterModel, check, check_by_key,
)

A, R = AppendListModel, RegisterModel


def w(call, ret, v):
    return Op(call, ret, ("write", v))


def r(call, ret, v):
    return Op(call, ret, ("read",), v)


def ap(call, ret, v):
    return Op(call, ret, ("append", v))


def rd(call, ret, *vals):
    return Op(call, ret, ("read",), tuple(vals))


GOOD_REGISTER = [
    [],
    [w(0, 1, 1), r(2, 3, 1)],
    [w(0, 10, 1), r(1, 2, None), r(3, 4, 1)],            # read inside a write: either value
    [w(0, 10, 1), r(1, 2, 1), r(3, 4, 1)],
    [w(0, 5, 1), w(1, 6, 2), r(7, 8, 1)],                # concurrent writes: 2 then 1
    [w(0, 5, 1), w(1, 6, 2), r(7, 8, 2)],
    [w(0, None, 1), r(5, 6, 1)],                         # a write that never returned took effect
    [w(0, None, 1), r(5, 6, None)],                      # ... or did not
    [w(0, 1, 1), w(2, 3, 2), r(1, 2, 1)],                # touching intervals count as concurrent
]

BAD_REGISTER = [
    [w(0, 1, 1), r(2, 3, None)],                          # stale read after the write returned
    [r(0, 1, 1), w(2, 3, 1)],                             # read sees a write not yet called
    [w(0, 1, 1), w(2, 3, 2), r(4, 5, 1)],                 # sequential writes, old value read
    [w(0, 10, 1), r(1, 2, 1), r(3, 4, None)],             # value appears then disappears
    [w(0, 1, 1), r(2, 3, 7)],                             # a value nobody wrote
    [w(0, 9, 1), w(0, 9, 2), r(1, 2, 1), r(3, 4, 2), r(5, 6, 1)],  # flip-flop
]


@pytest.mark.parametrize("history", GOOD_REGISTER)
def test_register_accepts(history):
    assert check(history, R)


@pytest.mark.parametrize("history", BAD_REGISTER)
def test_register_rejects(history):
    assert not check(history, R)


def test_append_list_histories():
    assert check([ap(0, 2, "x"), ap(1, 3, "y"), rd(4, 5, "y", "x")], A)
    assert check([ap(0, 2, "x"), ap(1, 3, "y"), rd(4, 5, "x", "y")], A)
    assert not check([ap(0, 1, "x"), ap(2, 3, "y"), rd(4, 5, "y", "x")], A)   # order inverted
    assert not check([ap(0, 1, "x"), rd(2, 3)], A)                            # lost append
    assert not check([ap(0, 5, "x"), rd(1, 2, "x"), rd(3, 4)], A)
    assert check([ap(0, None, "x"), rd(1, 2), rd(3, 4, "x")], A)               # pending append


def test_by_key_finds_the_bad_key():
    h = [Op(0, 1, ("k1", ("append", "a"))), Op(2, 3, ("k1", ("read",)), ("a",)),
         Op(0, 1, ("k2", ("append", "b"))), Op(2, 3, ("k2", ("read",)), ())]
    assert check_by_key(h, A) == "k2"
    assert check_by_key(h[:2], A) is None


def _brute_force(history, model):
    """Try every order of every subset of never-returned ops (small histories only)."""
    n = len(history)
    for perm in itertools.permutations(range(n)):
        ok = True
        for i, a in enumerate(perm):                     # real-time order
            for b in perm[i + 1:]:
                rb = history[b].ret
                if rb is not None and rb < history[a].call:
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            continue
        state = model.init
        for i in perm:
            op = history[i]
            good, state = model.step(state, op.input, op.output)
            if not good:
                break
        else:
            return True
    return False


def test_agrees_with_brute_force_on_random_small_histories():
    rng = random.Random(7)
    seen = {True: 0, False: 0}
    for _ in range(400):
        hist = []
        for i in range(rng.randint(1, 5)):
            call = rng.randint(0, 8)
            ret = call + rng.randint(0, 4)
            if rng.random() < 0.5:
                hist.append(w(call, ret, i))
            else:
                hist.append(r(call, ret, rng.choice([None] + list(range(i)))))
        want = _brute_force(hist, R)
        assert check(hist, R) == want, hist
        seen[want] += 1
    assert seen[True] > 20 and seen[False] > 20


def test_a_long_sequential_history_is_fast():
    hist = []
    for i in range(2000):
        hist.append(ap(3 * i, 3 * i + 1, i))
    hist.append(rd(10 ** 6, 10 ** 6 + 1, *range(2000)))
    assert check(hist, A)


def test_ordered_append_model_matches_the_general_one_with_a_final_read():
    rng = random.Random(11)
    for _ in range(300):
        hist = []
        for i in range(rng.randint(1, 5)):
            call = rng.randint(0, 8)
            ret = call + rng.randint(0, 4)
            if rng.random() < 0.5:
                hist.append(ap(call, ret, i))
            else:
                k = rng.randint(0, i)
                hist.append(rd(call, ret, *rng.sample(range(i), min(k, i))))
        appended = [op.input[1] for op in hist if op.input[0] == "append"]
        order = tuple(rng.sample(appended, len(appended)))
        final = hist + [rd(100, 101, *order)]
        assert check(final, OrderedAppendModel(order)) == check(final, A), final


def test_ordered_append_model_handles_many_overlapping_appends():
    order = tuple(range(60))
    hist = [ap(0, 100, v) for v in order] + [rd(50, 60, *order[:30]), rd(200, 201, *order)]
    assert check(hist, OrderedAppendModel(order))
    assert not check(hist + [rd(300, 301, *order[:59])], OrderedAppendModel(order))
