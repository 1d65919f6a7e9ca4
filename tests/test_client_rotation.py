"""The failover policy alone: which node next, how long to wait, when to give up."""

from paxchat.client.failover import FailoverPolicy, Rotation

POLICY = FailoverPolicy(jitter=0, initial_delay=1, factor=2, max_delay=3, deadline=20)


def test_starts_at_a_random_other_node_tries_the_lost_one_last_and_cycles():
    r = Rotation([1, 2, 3], POLICY, now=0, after=2, random=lambda: 0.0)
    assert [r.next_attempt(0)[0] for _ in range(4)] == [1, 3, 2, 1]
    r = Rotation([1, 2, 3], POLICY, now=0, after=2, random=lambda: 0.99)
    assert [r.next_attempt(0)[0] for _ in range(4)] == [3, 1, 2, 3]


def test_the_clients_of_a_lost_node_spread_over_the_others():
    import random
    rng = random.Random(7)
    firsts = [Rotation([1, 2, 3, 4, 5], POLICY, now=0, after=3, random=rng.random).next_attempt(0)[0]
              for _ in range(400)]
    counts = {n: firsts.count(n) for n in (1, 2, 4, 5)}
    assert 3 not in firsts and all(60 < c < 140 for c in counts.values()), counts


def test_with_no_node_chosen_the_first_is_random_so_clients_spread_over_all():
    import random
    rng = random.Random(11)
    firsts = [Rotation([1, 2, 3], POLICY, now=0, random=rng.random).next_attempt(0)[0]
              for _ in range(300)]
    counts = {n: firsts.count(n) for n in (1, 2, 3)}
    assert all(70 < c < 130 for c in counts.values()), counts
    r = Rotation([1, 2, 3], POLICY, now=0, random=lambda: 0.99)
    assert [r.next_attempt(0)[0] for _ in range(4)] == [3, 1, 2, 3]


def test_prefers_a_chosen_first_node():
    r = Rotation([1, 2, 3], POLICY, now=0, first=2)
    assert r.next_attempt(0) == (2, 0.0)


def test_backoff_grows_per_round_up_to_the_cap():
    r = Rotation([1, 2], POLICY, now=0)
    delays = [r.next_attempt(0)[1] for _ in range(10)]
    assert delays == [0, 0, 1, 0, 2, 0, 3, 0, 3, 0]


def test_deadline_ends_the_campaign_and_delays_never_pass_it():
    r = Rotation([1], POLICY, now=100)
    assert r.next_attempt(100) == (1, 0.0)
    assert r.next_attempt(119.5) == (1, 0.5)
    assert r.next_attempt(120) is None


def test_jitter_stays_within_bounds():
    policy = FailoverPolicy(jitter=0.5, initial_delay=2, deadline=100)
    for value in (0.0, 1.0):
        r = Rotation([1], policy, now=0, random=lambda: value)
        r.next_attempt(0)
        assert r.next_attempt(0)[1] in (1.0, 3.0)


def test_a_round_is_over_once_every_node_had_its_attempt_and_the_next_starts_afresh():
    from paxchat.client.failover import NOT_ACCEPTED, UNTRUSTED, Attempt
    r = Rotation([1, 2, 3], POLICY, now=0, random=lambda: 0.0)
    for node in (1, 2):
        assert r.next_attempt(0)[0] == node
        r.failed(Attempt(node, NOT_ACCEPTED, "connection refused"))
        assert r.round_over() is None
    assert r.next_attempt(0)[0] == 3
    r.failed(Attempt(3, UNTRUSTED, "certificate refused"))
    assert [(a.node_id, a.kind) for a in r.round_over()] == [(1, NOT_ACCEPTED), (2, NOT_ACCEPTED), (3, UNTRUSTED)]
    assert r.next_attempt(0)[0] == 1
    assert r.round_over() is None and r.outcomes == {}
