"""A linearizability checker (Wing & Gong search with Lowe's memoization).

A history is a list of ``Op(call, ret, input, output)``: real-time interval
``[call, ret]`` (``ret=None``: never returned, it may or may not have taken
effect), what the client asked and what it got. ``check(history, model)``
searches for a total order that respects real time (an op that returned
before another was called comes first) and in which every op's output is the
model's. The search linearizes, at each point, any op whose call is before
the earliest pending return, and backtracks; ``(set of linearized ops,
model state)`` pairs already explored are cached, which is what makes it
practical (porcupine's algorithm).

Models are objects with ``init`` (a hashable state) and
``step(state, input, output) -> (ok, new_state)``; ``partition(history)``
splits a history into independent sub-histories (per key), since
linearizability is local.
"""

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Op", "check", "AppendListModel", "OrderedAppendModel", "RegisterModel",
           "check_by_key", "SearchTooLarge"]

INF = float("inf")


@dataclass(frozen=True)
class Op:
    call: float
    ret: Optional[float]
    input: Any
    output: Any = None


class AppendListModel:
    """A list that writes append to: ``("append", v)`` -> None, ``("read",)`` -> tuple."""
    init = ()

    @staticmethod
    def step(state, inp, out):
        if inp[0] == "append":
            return True, state + (inp[1],)
        return out == state, state


class OrderedAppendModel:
    """An append-only list whose final order is known (a read at the end saw it).

    Every linearization must put the appends in that order, so the state is
    just how many are in: the search stays small however many appends overlap.
    A history is linearizable under this model iff it is under
    ``AppendListModel`` *and* a final read returning ``order``.
    """

    def __init__(self, order):
        self.order = tuple(order)
        self.position = {v: i for i, v in enumerate(self.order)}
        self.init = 0

    def step(self, state, inp, out):
        if inp[0] == "append":
            return self.position.get(inp[1]) == state, state + 1
        return len(out) == state and out == self.order[:state], state


class SearchTooLarge(RuntimeError):
    """The search explored more states than allowed."""


class RegisterModel:
    """A register: ``("write", v)`` -> None, ``("read",)`` -> the value (None at first)."""
    init = None

    @staticmethod
    def step(state, inp, out):
        if inp[0] == "write":
            return True, inp[1]
        return out == state, state


class _Entry:
    __slots__ = ("time", "is_call", "op_id", "match", "prev", "next")

    def __init__(self, time, is_call, op_id):
        self.time = time
        self.is_call = is_call
        self.op_id = op_id
        self.match = None
        self.prev = None
        self.next = None


def _build(history):
    events = []
    for i, op in enumerate(history):
        ret = INF if op.ret is None else op.ret
        if ret < op.call:
            raise ValueError(f"op {i} returns before it is called: {op}")
        events.append((op.call, 0, i))
        events.append((ret, 1, i))
    # At equal times calls come first: touching ops count as concurrent.
    events.sort()
    head = _Entry(None, False, -1)
    prev = head
    calls = {}
    for t, kind, i in events:
        e = _Entry(t, kind == 0, i)
        if kind == 0:
            calls[i] = e
        else:
            calls[i].match = e
        prev.next = e
        e.prev = prev
        prev = e
    return head


def _lift(e):
    e.prev.next = e.next
    if e.next:
        e.next.prev = e.prev
    m = e.match
    m.prev.next = m.next
    if m.next:
        m.next.prev = m.prev


def _unlift(e):
    m = e.match
    m.prev.next = m
    if m.next:
        m.next.prev = m
    e.prev.next = e
    if e.next:
        e.next.prev = e


def check(history, model, max_states=2_000_000):
    """True iff ``history`` is linearizable with respect to ``model``.

    Raises ``SearchTooLarge`` if the search explores more than ``max_states``.
    """
    history = list(history)
    if not history:
        return True
    head = _build(history)
    state = model.init
    linearized = 0
    cache = set()
    stack = []
    entry = head.next
    explored = 0
    while head.next is not None:
        if entry.is_call:
            op = history[entry.op_id]
            ok, new_state = model.step(state, op.input, op.output)
            if ok:
                new_lin = linearized | (1 << entry.op_id)
                key = (new_lin, new_state)
                if key not in cache:
                    explored += 1
                    if explored > max_states:
                        raise SearchTooLarge(f"linearizability search passed {max_states} states")
                    cache.add(key)
                    stack.append((entry, state))
                    state = new_state
                    linearized = new_lin
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # A return is reached with its op not linearized: backtrack.
            if not stack:
                return False
            entry, state = stack.pop()
            linearized &= ~(1 << entry.op_id)
            _unlift(entry)
            entry = entry.next
    return True


def check_by_key(history, model):
    """Check ops of the form ``Op(.., input=(key, inner_input), ..)`` key by key.

    ``model`` is a model, or a function of the key returning one. Returns None
    when linearizable, else the key whose sub-history is not.
    """
    by_key = {}
    for op in history:
        key, inner = op.input
        by_key.setdefault(key, []).append(Op(op.call, op.ret, inner, op.output))
    for key in sorted(by_key):
        m = model(key) if callable(model) and not hasattr(model, "step") else model
        if not check(by_key[key], m):
            return key
    return None
