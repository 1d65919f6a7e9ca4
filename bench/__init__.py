"""paxchat benchmarks against etcd, each on a local 3-node cluster of both.

``python -m bench`` runs them all (``--help`` for sizes, selection and
profiling); docs/performance.md has the results and how they were taken.
Every benchmark measures paxchat and, where the two can be compared, etcd in
the same run with the same kind of Twisted load generator, and prints the
ratio.
"""
