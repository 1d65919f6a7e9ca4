"""Latency samples and throughput over a measurement window, and how they are printed."""

from __future__ import annotations

import math


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class Recorder:
    """Completions of one run: counted in the window [start, end), errors by code.

    Latencies are kept for requests that both started and ended inside the
    window, so warm-up and the drain after it do not skew them.
    """

    def __init__(self):
        self.window = None
        self.latencies = []
        self.completed = 0
        self.errors = {}
        self.samples = []  # (sent_at, done_at, ok) when keep_samples
        self._total_ok = 0

    keep_samples = False

    def first_success_after(self, moment):
        """When the first request sent after ``moment`` succeeded, or None."""
        done = [d for sent, d, ok in self.samples if ok and sent > moment]
        return min(done) if done else None

    @property
    def total_ok(self):
        return self._total_ok

    def set_window(self, start, end):
        self.window = (start, end)

    def ok(self, sent_at, done_at):
        self._total_ok += 1
        if self.keep_samples:
            self.samples.append((sent_at, done_at, True))
        if self.window is None:
            return
        start, end = self.window
        if start <= done_at < end:
            self.completed += 1
            if sent_at >= start:
                self.latencies.append(done_at - sent_at)

    def error(self, code, sent_at=None, done_at=None):
        self.errors[code] = self.errors.get(code, 0) + 1
        if self.keep_samples and sent_at is not None:
            self.samples.append((sent_at, done_at, False))

    def summary(self) -> dict:
        if self.window is None:
            return {"completed": self._total_ok, "errors": dict(self.errors)}
        start, end = self.window
        values = sorted(self.latencies)
        return {
            "ops_per_s": self.completed / (end - start) if end > start else 0.0,
            "completed": self.completed,
            "p50_ms": _ms(percentile(values, 0.50)),
            "p99_ms": _ms(percentile(values, 0.99)),
            "p999_ms": _ms(percentile(values, 0.999)),
            "errors": dict(self.errors),
        }


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 2)


def fmt(value, unit="", digits=1):
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def ratio(ours, theirs, higher_is_better=True):
    """paxchat / etcd when higher is better, etcd / paxchat otherwise: >1 means paxchat wins."""
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return None
    return ours / theirs if higher_is_better else theirs / ours


def times(value, baseline):
    """``value / baseline`` to two places (a figure against its own quiet value), or None."""
    return None if not value or not baseline else round(value / baseline, 2)


def fmt_ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"
