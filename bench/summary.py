"""The results as the Markdown table docs/performance.md keeps."""

from __future__ import annotations

from . import stats


def _writes(r):
    return (f"{stats.fmt(r.get('ops_per_s'), '/s', 0)}; p50 {stats.fmt(r.get('p50_ms'))} / "
            f"p99 {stats.fmt(r.get('p99_ms'))} / p99.9 {stats.fmt(r.get('p999_ms'))} ms"
            + (f"; server CPU {r['server_cpu_us']:,} us/write" if r.get("server_cpu_us") else "")
            + (f"; errors {r['errors']}" if r.get("errors") else ""))


def _failover(r):
    return f"p50 {r['p50_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}, {r['rounds']} rounds)"


def _catchup(r):
    extra = f"; {r['after_serving_s']:.2f} s after serving" if "after_serving_s" in r else ""
    if r.get("peak_rss_mib"):
        extra += (f"; peak RSS {r['peak_rss_mib']:,.0f} MiB (the others"
                  f" {r.get('others_peak_rss_mib') or 0:,.0f}, +{r.get('others_growth_mib') or 0:,.0f})")
    return f"{r['current_s']:.2f} s{extra}"


def _generic(r):
    if "ops_per_s" in r:
        return _writes(r)
    if "current_s" in r:
        return _catchup(r)
    skip = {"bench", "system", "label"}
    return ", ".join(f"{k} {_value(v)}" for k, v in r.items() if k not in skip)


def _value(v):
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


SHOW = {"writes": _writes, "failover": _failover, "catchup": _catchup}


def markdown(results) -> str:
    lines = ["| benchmark | point | paxchat | etcd | paxchat vs etcd (>1 = better) |",
             "|---|---|---|---|---|"]
    rows = {}
    for r in results:
        key = (r["bench"], r["label"])
        rows.setdefault(key, {})[r["system"]] = r
    for (bench, label), systems in rows.items():
        show = SHOW.get(bench, _generic)
        ours = show(systems["paxchat"]) if "paxchat" in systems else "-"
        theirs = show(systems["etcd"]) if "etcd" in systems else "-"
        ratio = systems.get("ratio")
        shown_ratio = ", ".join(f"{k} {stats.fmt_ratio(v)}" for k, v in ratio.items()
                                if k not in ("bench", "system", "label")) if ratio else "-"
        lines.append(f"| {bench} | {label} | {ours} | {theirs} | {shown_ratio} |")
    return "\n".join(lines)
