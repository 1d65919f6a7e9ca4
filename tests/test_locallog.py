"""LocalLog: ordered group commit over a worker, with a fake worker we drive by hand."""

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from paxchat.interfaces import ICommandLog
from paxchat.locallog import LocalLog


class ManualWorker:
    """Records each call and lets the test fire its Deferred when it likes."""

    def __init__(self, applied_index=0):
        self.calls = []
        self.applied_index = applied_index

    def call(self, name, *args):
        d = defer.Deferred()
        self.calls.append((name, args, d))
        return d

    def pending(self):
        return [(name, args) for name, args, d in self.calls if not d.called]

    def finish(self, n=0, result=None):
        """Fire the n-th still pending call; apply_entries answers one response per command."""
        name, args, d = [c for c in self.calls if not c[2].called][n]
        if name == "applied_index":
            d.callback(self.applied_index if result is None else result)
        elif name == "apply_entries":
            if result is None:
                result = [[{"ok": True, "result": {"echo": c["n"]}} for c in cmds]
                          for _, cmds in args[0]]
                self.applied_index = args[0][-1][0]
            d.callback(result)
        return name, args


def make(applied_index=0, node_id=3):
    worker = ManualWorker(applied_index)
    return LocalLog(Clock(), worker, node_id=node_id), worker


def test_provides_the_interface_and_names_itself_leader():
    log, _ = make(node_id=3)
    verifyObject(ICommandLog, log)
    assert log.node_id == 3
    assert log.leader_id() == 3


def test_reads_applied_index_then_applies_at_the_next_index():
    log, worker = make(applied_index=41)
    d = log.submit({"op": "x", "n": 1})
    assert worker.pending() == [("applied_index", ())]
    worker.finish()
    assert worker.pending() == [("apply_entries", ([(42, [{"op": "x", "n": 1}])],))]
    worker.finish()
    assert d.result == {"ok": True, "result": {"echo": 1}}
    assert log.applied_index == 42


def test_commands_arriving_during_a_batch_form_the_next_batch():
    log, worker = make()
    worker_first = log.submit({"op": "x", "n": 1})
    worker.finish()  # applied_index
    later = [log.submit({"op": "x", "n": n}) for n in (2, 3, 4)]
    # Only the first batch is in the worker; the others wait together.
    assert worker.pending() == [("apply_entries", ([(1, [{"op": "x", "n": 1}])],))]
    worker.finish()
    assert worker_first.result["result"] == {"echo": 1}
    assert not any(d.called for d in later)
    assert worker.pending() == [("apply_entries", ([(2, [{"op": "x", "n": n} for n in (2, 3, 4)])],))]
    worker.finish()
    assert [d.result["result"]["echo"] for d in later] == [2, 3, 4]
    assert log.applied_index == 2
    assert worker.pending() == []


def test_observers_see_every_command_in_order_before_its_answer():
    log, worker = make()
    seen = []
    log.add_observer(lambda command, response: seen.append((command["n"], response["result"]["echo"])))
    answered = []
    for n in range(5):
        log.submit({"op": "x", "n": n}).addCallback(lambda r, n=n: answered.append((n, len(seen))))
    worker.finish()  # applied_index
    worker.finish()  # all five in one batch
    assert seen == [(n, n) for n in range(5)]
    # Each command's observers ran before its submitter heard back.
    assert answered == [(n, n + 1) for n in range(5)]


def test_a_failing_observer_does_not_stop_the_others_or_the_answer():
    log, worker = make()
    seen = []

    def broken(command, response):
        raise ValueError("observer bug")

    log.add_observer(broken)
    log.add_observer(lambda c, r: seen.append(c["n"]))
    d = log.submit({"op": "x", "n": 7})
    worker.finish()
    worker.finish()
    assert seen == [7]
    assert d.result["ok"] is True


def test_read_barrier_waits_for_writes_submitted_before_it_only():
    log, worker = make()
    assert log.read_barrier().called  # nothing in flight
    log.submit({"op": "x", "n": 1})
    worker.finish()
    barrier = log.read_barrier()
    log.submit({"op": "x", "n": 2})
    assert not barrier.called
    worker.finish()  # batch with n=1
    assert barrier.called
    late = log.read_barrier()
    assert not late.called
    worker.finish()  # batch with n=2
    assert late.called


def test_a_failed_batch_errbacks_its_commands_and_the_log_goes_on_at_the_same_index():
    log, worker = make()
    d1 = log.submit({"op": "x", "n": 1})
    worker.finish()
    d2 = log.submit({"op": "x", "n": 2})
    barrier = log.read_barrier()
    _, _, apply1 = worker.calls[-1]
    apply1.errback(RuntimeError("disk full"))
    failures = []
    d1.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    assert not barrier.called
    name, args = worker.finish()
    assert args == ([(1, [{"op": "x", "n": 2}])],)
    assert d2.result["result"] == {"echo": 2}
    assert barrier.called


def test_a_skipped_entry_fails_its_commands_instead_of_hanging():
    log, worker = make()
    d = log.submit({"op": "x", "n": 1})
    worker.finish()
    worker.finish(result=[None])
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)


def test_batches_are_bounded():
    worker = ManualWorker()
    log = LocalLog(Clock(), worker, max_batch=2)
    ds = [log.submit({"op": "x", "n": n}) for n in range(5)]
    worker.finish()
    sizes = []
    while worker.pending():
        name, args = worker.finish()
        sizes.append(len(args[0][0][1]))
    assert sizes == [2, 2, 1]
    assert [d.result["result"]["echo"] for d in ds] == list(range(5))
