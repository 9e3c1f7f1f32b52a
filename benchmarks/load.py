"""Load-time benchmark: memlm's loader vs transformers' GGUF loader, each in a fresh process.

For each loader it prints: wall time to load model + tokenizer, the runtime baseline RSS (after
imports, before loading), peak RSS while loading (VmHWM, reset just before the load), the peak
above baseline, RSS after loading, and bytes of weights as loaded; then memlm/transformers ratios.

    python benchmarks/load.py                       # SmolLM2-135M-Instruct (the default preset)
    python benchmarks/load.py --model path/to.gguf  # any GGUF (transformers must support it too)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak covers only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def worker(kind: str, model: str) -> dict:
    """Runs in a child process: import, measure baseline, load, measure peak."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if kind == "memlm":
        from memlm.loading import load_model
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from memlm.models.registry import is_preset, resolve_preset
        path = resolve_preset(model) if is_preset(model) else Path(model)
    import torch  # noqa: F401  (part of the baseline for both)

    baseline = _status_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if kind == "memlm":
        lm = load_model(model)
        weights = lm.weight_bytes
    else:
        m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        weights = _unique_bytes(list(m.parameters()) + list(m.buffers()))
    seconds = time.perf_counter() - t0
    return {"loader": kind, "seconds": seconds, "baseline_kib": baseline, "peak_kib": _status_kib("VmHWM"),
            "after_kib": _status_kib("VmRSS"), "weight_bytes": weights}


def run_child(kind: str, model: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", model],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} loader failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--worker", choices=["memlm", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--no-competitor", action="store_true", help="skip the transformers run")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model)))
        return
    rows = [run_child("memlm", args.model)]
    if not args.no_competitor:
        rows.append(run_child("transformers", args.model))
    mib = lambda kib: kib / 1024
    print(f"model: {args.model}")
    print(f"{'loader':<14}{'load s':>8}{'baseline MiB':>14}{'peak MiB':>10}{'peak-base MiB':>15}"
          f"{'after MiB':>11}{'weights MiB':>13}")
    for r in rows:
        print(f"{r['loader']:<14}{r['seconds']:>8.2f}{mib(r['baseline_kib']):>14.0f}{mib(r['peak_kib']):>10.0f}"
              f"{mib(r['peak_kib'] - r['baseline_kib']):>15.0f}{mib(r['after_kib']):>11.0f}"
              f"{r['weight_bytes'] / 2**20:>13.0f}")
    if len(rows) == 2:
        m, t = rows
        print(f"ratios memlm/transformers: load time {m['seconds'] / t['seconds']:.2f}x, "
              f"peak RSS {m['peak_kib'] / t['peak_kib']:.2f}x, "
              f"peak above baseline {(m['peak_kib'] - m['baseline_kib']) / (t['peak_kib'] - t['baseline_kib']):.2f}x, "
              f"weights {m['weight_bytes'] / t['weight_bytes']:.2f}x")


if __name__ == "__main__":
    main()
