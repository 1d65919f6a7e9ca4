"""What every benchmark gets: its size, work dirs, the etcd binary (or why not), output."""

from __future__ import annotations

import json
import os
import sys
import tempfile

from . import stats


class Context:
    """Options and the results collected so far (printed as they come, JSON at the end)."""

    def __init__(self, tiny=False, etcd_binary=None, etcd_reason="", etcd_version=None,
                 base_dir=None, keep=False, profile=None, out=sys.stdout):
        self.tiny = tiny
        self.etcd_binary = etcd_binary
        self.etcd_reason = etcd_reason
        self.etcd_version = etcd_version
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="paxchat-bench-")
        self.keep = keep
        self.profile = profile  # None, "py-spy" or "pyinstrument"
        self.out = out
        self.results = []
        self.with_paxchat = True
        self.clients = None  # writes: client counts instead of the size's own

    @property
    def with_etcd(self) -> bool:
        return self.etcd_binary is not None

    def workdir(self, name) -> str:
        path = os.path.join(self.base_dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def say(self, text):
        self.out.write(text + "\n")
        self.out.flush()

    def record(self, bench, system, label, **figures):
        """One measured point: printed on one line and kept for --json."""
        self.results.append({"bench": bench, "system": system, "label": label, **figures})
        shown = "  ".join(f"{k}={_show(v)}" for k, v in figures.items())
        self.say(f"[{bench}] {system:<7} {label}: {shown}")

    def compare(self, bench, label, **ratios):
        """paxchat against etcd for one point; every ratio is >= 1 when paxchat is better."""
        self.results.append({"bench": bench, "system": "ratio", "label": label, **ratios})
        shown = "  ".join(f"{k}={stats.fmt_ratio(v)}" for k, v in ratios.items())
        self.say(f"[{bench}] ratio   {label}: {shown} (paxchat vs etcd, >1 = paxchat better)")

    def skip_etcd(self, bench):
        self.say(f"[{bench}] etcd    skipped: {self.etcd_reason}")

    def find(self, bench, system, label):
        for r in self.results:
            if (r["bench"], r["system"], r["label"]) == (bench, system, label):
                return r
        return None

    def write_json(self, path, meta):
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": self.results}, f, indent=1)


def _show(value):
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}" if value else "{}"
    return str(value)
