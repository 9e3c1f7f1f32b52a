"""Data-parallel `memlm train` under torchrun (2 ranks, gloo) vs one process, same global batch.

    python benchmarks/ddp.py             # 100 steps of a 4-layer student on Shakespeare
    python benchmarks/ddp.py --quick     # a 2-layer student, 50 steps

Runs in one invocation: one process with 1 thread, one process with 2 threads, and
`torchrun --nproc-per-node 2` with 1 thread per rank (the same 2 cores), all with the same
seed and global batch. Prints the max relative difference of the per-step training losses
against the 1-thread single process, the final held-out loss of each, and the time per step
(from the step log's timestamps, first step excluded). On a 2-vCPU machine shared with other
work there is no speed-up to expect: the two ranks share the cores the 2-thread process uses,
plus the all-reduce of every gradient.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _run(cmd: list[str], threads: int) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--student", default="layers=4,hidden=128,heads=4,kv_heads=2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--work-dir", default=None, help="token files and checkpoints (default: a temp dir)")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.student, a.seq_len = 50, "layers=2,hidden=64,heads=2,kv_heads=1", 64
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="memlm-ddp-"))
    from memlm.training.data import TextTokenizer, load_corpus, split_documents
    tok_dir = work / "bpe"
    if not (tok_dir / "tokenizer.json").exists():
        tok_dir.mkdir(parents=True, exist_ok=True)
        train_docs, _ = split_documents(load_corpus(a.corpus))
        TextTokenizer.train([d.text for d in train_docs], 2048).save(tok_dir / "tokenizer.json")
    common = ["--corpus", a.corpus, "--data-dir", str(work / "data"), "--tokenizer", str(tok_dir),
              "--student", a.student, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
              "--seq-len", str(a.seq_len), "--eval-every", str(a.steps), "--eval-tokens", "8192"]
    print(f"# DDP benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"CPU: {_cpu()}; {os.cpu_count()} vCPUs; load average at start {os.getloadavg()[0]:.2f}; "
          f"student {a.student}, global batch {a.batch_size} x {a.seq_len}, {a.steps} steps, corpus {a.corpus}")
    # the token files once, so no run pays for them
    _run([sys.executable, "-m", "memlm", "train", *common, "--steps", "1", "--threads", "1"], 1)
    runs = {"single, 1 thread": (1, []), "single, 2 threads": (2, []), "torchrun 2 ranks x 1 thread": (1, ["ddp"])}
    logs, walls = {}, {}
    for name, (threads, kind) in runs.items():
        log = work / f"{len(logs)}.jsonl"
        log.unlink(missing_ok=True)
        args = ["train", *common, "--threads", str(threads), "--log-file", str(log), "--out", str(work / f"out{len(logs)}")]
        if kind:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(_port()), "-m", "memlm", *args]
        else:
            cmd = [sys.executable, "-m", "memlm", *args]
        walls[name] = _run(cmd, threads)
        logs[name] = _log(log)
    ref = logs["single, 1 thread"]
    print()
    print("| run | max rel. loss diff vs single/1 thread | final train loss | ms / step | wall s (incl. start) |")
    print("|---|---:|---:|---:|---:|")
    for name, log in logs.items():
        diff = max(abs(x["loss"] - r["loss"]) / r["loss"] for x, r in zip(log, ref))
        per_step = (log[-1]["time"] - log[0]["time"]) / max(1, len(log) - 1) * 1000
        print(f"| {name} | {diff:.2e} | {log[-1]['loss']:.4f} | {per_step:.1f} | {walls[name]:.1f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (shared machine: times are under load)")


if __name__ == "__main__":
    main()
