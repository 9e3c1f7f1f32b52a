"""Data-parallel `memlm train` / `memlm distill` under torchrun (2 CPU ranks, gloo, 127.0.0.1):
the loss curve of the same global batch matches one process, a SIGKILLed run resumes from its
last checkpoint and ends where an uninterrupted run ends, and each rank reads disjoint rows."""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import tiny_teacher_world

from memlm.distributed.ddp import DistEnv, env_from
from memlm.entrypoints.cli import main
from memlm.errors import MemlmError
from memlm.training import checkpoint
from memlm.training.data import WindowSampler

TEXT = "\n\n".join(f"Scene {i}. Enter the king and the queen; they speak of crowns, of {i} ships and of "
                   f"the sea. The lords are {i * 7} and the rest. Exeunt." for i in range(600))
STEPS = 100


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), "-m", "memlm", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its ranks (torchrun starts each rank in a session of its own)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for children in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                todo += [int(c) for c in open(children).read().split()]
            except OSError:
                pass
    for p in reversed(pids):                  # the ranks first, so nothing is left to restart them
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(path))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_teacher_world(tmp_path_factory.mktemp("ddp"), TEXT)


def _train_args(d, name, steps=STEPS, extra=()):
    return ["train", "--corpus", str(d / "corpus.txt"), "--data-dir", str(d / "data"), "--tokenizer",
            str(d / "teacher"), "--student", "layers=2,hidden=32,heads=2,kv_heads=1", "--steps", str(steps),
            "--batch-size", "8", "--seq-len", "32", "--eval-every", "50", "--eval-tokens", "512", "--threads", "1",
            "--log-file", str(d / f"{name}.jsonl"), "--out", str(d / name), *extra]


@pytest.fixture(scope="module")
def curves(world):
    """One process and 2 ranks, the same global batch of 8, 100 steps each."""
    assert main(_train_args(world, "single")) == 0
    p = _torchrun(_train_args(world, "ddp"))
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    assert "2 ranks (gloo)" in out and "2 ranks x 4 rows" in out
    return _losses(world / "single.jsonl"), _losses(world / "ddp.jsonl"), out


def test_two_ranks_reproduce_the_single_process_loss_curve(curves):
    single, ddp, out = curves
    assert sorted(single) == sorted(ddp) == list(range(1, STEPS + 1))
    rel = max(abs(single[s] - ddp[s]) / single[s] for s in single)
    assert rel < 0.01, rel
    assert single[STEPS] < single[1] - 1.0          # it did learn
    assert out.count("train: 100 steps") == 1        # only rank 0 reports


def test_sigkill_then_resume_continues_from_the_last_checkpoint(world, curves):
    d, ddp = world, curves[1]
    args = _train_args(d, "killed", extra=["--checkpoint-every", "10"])
    p = _torchrun(args)
    state, killed_at, deadline = d / "killed" / "train_state" / "state.json", None, time.monotonic() + 200
    while p.poll() is None and time.monotonic() < deadline:
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):      # not written yet, or being swapped in
            step = 0
        if step >= 20:
            _kill_tree(p.pid)
            killed_at = step
            break
        time.sleep(0.02)
    p.communicate(timeout=60)
    assert killed_at is not None and p.returncode != 0, "the run ended before it could be killed"
    logged = _losses(d / "killed.jsonl")
    assert max(logged) < STEPS                        # it was stopped mid-run
    q = _torchrun([*args, "--resume"])
    out, _ = q.communicate(timeout=240)
    assert q.returncode == 0, out
    resumed = [json.loads(line) for line in open(d / "killed.jsonl")][len(logged):]
    first = resumed[0]["step"]
    assert killed_at < first <= max(logged) + 1 and first % 10 == 1   # from the last checkpoint on
    for r in resumed:
        assert r["loss"] == pytest.approx(ddp[r["step"]], rel=1e-6)
    a = checkpoint.load_model_dir(d / "killed").state_dict()
    b = checkpoint.load_model_dir(d / "ddp").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_distill_with_a_teacher_cache_built_by_both_ranks(world):
    d = world

    def args(name, cache):
        return ["distill", "--teacher", str(d / "teacher"), "--student", "layers=1,hidden=32,heads=2",
                "--corpus", str(d / "corpus.txt"), "--data-dir", str(d / "data"), "--cache-dir", str(d / cache),
                "--steps", "20", "--batch-size", "4", "--seq-len", "32", "--top-k", "8", "--eval-every", "10",
                "--eval-tokens", "256", "--threads", "1", "--log-file", str(d / f"{name}.jsonl")]
    assert main(args("d1", "cache1")) == 0
    p = _torchrun(args("d2", "cache2"))
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    # each rank wrote its chunks (c % 2 == rank); the two caches hold the same teacher targets
    chunks = sorted(f.name for f in (d / "cache2").glob("chunk_*.zst"))
    assert len(chunks) >= 2 and chunks == sorted(f.name for f in (d / "cache1").glob("chunk_*.zst"))
    assert json.loads((d / "cache2" / "meta.json").read_text())["complete"] is True
    one, two = _losses(d / "d1.jsonl"), _losses(d / "d2.jsonl")
    assert max(abs(one[s] - two[s]) / one[s] for s in one) < 0.01


def test_ranks_read_disjoint_rows_whose_union_is_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    whole = WindowSampler(tokens, 8, 16, seed=4)
    parts = [WindowSampler(tokens, 8, 16, seed=4, shard=(r, 2)) for r in range(2)]
    for step in (0, 7, 99):
        rows = [p.batch(step)["input"] for p in parts]
        assert rows[0].shape == (4, 16)
        assert torch.equal(torch.cat(rows)[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])], whole.batch(step)["input"])
        assert set(parts[0].starts(step)).isdisjoint(parts[1].starts(step)) or len(set(whole.starts(step))) < 8
    with pytest.raises(MemlmError, match="divisible by the number of ranks"):
        WindowSampler(tokens, 6, 16, shard=(0, 4))


def test_torchrun_environment_is_read_and_checked():
    assert env_from({}) is None
    assert env_from({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DistEnv(1, 2, 1)
    with pytest.raises(MemlmError, match="inconsistent torchrun environment"):
        env_from({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(MemlmError, match="must be integers"):
        env_from({"RANK": "x", "WORLD_SIZE": "2"})
