"""Deterministic simulation of a Paxos cluster (see docs/testing.md).

``cluster.run_seed(seed)`` runs one seed; ``python -m tests.sim`` runs many.
"""
