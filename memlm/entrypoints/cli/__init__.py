"""The `memlm` command line: one module per command group — `generate.py` (generate, chat),
`info.py`, `bench.py`, `serve.py`, `train.py` (train, distill, eval), `federated.py` — with shared flags in `args.py`.

Owns: building the parser from the groups' `add_commands(subparsers)`, and turning user errors
into one line on stderr with a non-zero exit code. Does not know: what any command does.
"""
from __future__ import annotations

import argparse
import sys

from memlm.entrypoints.cli import bench, generate, info, serve
from memlm.errors import MemlmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memlm", description="Run and distill language models inside a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_commands(sub)
    info.add_commands(sub)
    bench.add_commands(sub)
    serve.add_commands(sub)
    try:
        from memlm.entrypoints.cli.train import add_commands as add_training
    except ImportError:       # a trimmed install without the training extras
        add_training = None
    if add_training is not None:
        add_training(sub)
    from memlm.entrypoints.cli.federated import add_commands as add_federated   # Flower loads only when run
    add_federated(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        args = bench.bench_namespace(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MemlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # Validation errors from dataclasses and file errors are user errors too.
        print(f"error: {e}", file=sys.stderr)
        return 1
