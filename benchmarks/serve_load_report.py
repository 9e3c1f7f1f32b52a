"""Figures and the comparison table of `serve_load.py` (kept apart so the driver stays small).

Owns: percentiles, one phase's summary (outcome counts, TTFT / inter-token p50 and p99,
generated tok/s) and the final table with ratios against memlm and the acceptance checks.
Does not know: servers, HTTP or the workload.
"""
from __future__ import annotations

from collections import Counter

MIB = 2**20


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of values, None when there are none."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * len(v)) - 1))]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def summarize(results, wall: float, max_tokens: int) -> dict:
    """Outcome counts and latency / throughput figures of one phase; `short`: complete answers
    with fewer than max_tokens tokens (a server that cut them off)."""
    outcomes = Counter(r.outcome.split(" ")[0] for r in results)
    lost_why = Counter(r.outcome for r in results if r.outcome.startswith("lost"))
    statuses = Counter(r.status for r in results if r.outcome in ("error", "429"))
    ttft = [r.ttft for r in results if r.ttft is not None and r.outcome == "complete"]
    gaps = [g for r in results if r.outcome == "complete" for g in r.gaps]
    tokens = sum(r.tokens for r in results if r.outcome in ("complete", "disconnected"))
    s = {"n": len(results), "outcomes": dict(outcomes), "lost": outcomes.get("lost", 0),
         "lost_why": dict(lost_why), "statuses": {str(k): v for k, v in statuses.items()},
         "n429": outcomes.get("429", 0), "tok_s": tokens / wall if wall > 0 else 0.0,
         "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50),
         "itl_p99": pct(gaps, 99), "wall": wall,
         "short": sum(r.outcome == "complete" and r.tokens < max_tokens for r in results)}
    s["line"] = (f"{s['tok_s']:7.1f} tok/s  TTFT p50/p99 {_ms(s['ttft_p50'])}/{_ms(s['ttft_p99'])} ms  "
                 f"ITL p50/p99 {_ms(s['itl_p50'])}/{_ms(s['itl_p99'])} ms  {dict(outcomes)}  "
                 f"short {s['short']}  errors by status {s['statuses']}  {wall:.1f} s")
    if lost_why:
        s["line"] += f"  lost: {dict(lost_why)}"
    return s


def print_comparison(runs: list[dict], args) -> None:
    print("\n== summary (same run; the machine is shared, so only the ratios mean anything) ==")
    for run in runs:
        if "error" in run:
            print(f"{run['server']:8s} FAILED: {run['error']}")
            continue
        burst = run.get("burst")
        faults = f"burst: {burst['lost']} lost, {burst['n429']} x 429, " if burst else "no burst, "
        print(f"{run['server']:8s} start-up {run['startup_s']:.0f} s, peak RSS {run['peak_rss'] / MIB:.0f} MiB, "
              f"{faults}healthy after: {run['healthy_after']}")
    ok = {r["server"]: r for r in runs if "error" not in r}
    if "memlm" not in ok:
        return
    m = ok["memlm"]
    budget = getattr(args, "budget_bytes", None)
    lost = sum(lv["lost"] for lv in [*m["levels"].values(), *([m["burst"]] if "burst" in m else [])])
    checks = [("0 requests lost", lost == 0), ("healthy afterwards", m["healthy_after"])]
    if "burst" in m:
        checks.append(("overload answered with 429", m["burst"]["n429"] > 0))
    if budget:
        checks.append((f"peak RSS {m['peak_rss'] / MIB:.0f} MiB <= budget {budget / MIB:.0f} MiB",
                       m["peak_rss"] <= budget))
    for c in args.ramp:
        for other, target in (("vllm", 1.5), ("llamacpp", 2.0)):
            if other not in ok or c not in ok[other]["levels"]:
                continue
            a, b = m["levels"][c], ok[other]["levels"][c]
            ratio = a["tok_s"] / b["tok_s"] if b["tok_s"] else float("inf")
            line = (f"c={c:3d} memlm/{other}: {ratio:.2f}x tok/s ({a['tok_s']:.1f} vs {b['tok_s']:.1f}), "
                    f"TTFT p50 {_ms(a['ttft_p50'])} vs {_ms(b['ttft_p50'])} ms")
            print(line)
            if c == 32 or (c == max(args.ramp) and 32 not in args.ramp):
                checks.append((f"c={c} throughput >= {target}x {other}", ratio >= target))
                if other == "vllm":
                    checks.append((f"c={c} TTFT p50 no worse than vllm", (a["ttft_p50"] or 0) <= (b["ttft_p50"] or 0)))
    for name, passed in checks:
        print(f"  [{'met' if passed else 'NOT met'}] {name}")
