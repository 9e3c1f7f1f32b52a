"""Data-parallel `memlm train` / `memlm distill` under torchrun (2 CPU ranks, gloo, 127.0.0.1):
the loss curve of the same global batch matches one process, a SIGKILLed run resumes from its
last checkpoint, re-does the steps it lost exactly and ends where one process ends, and each
rank reads disjoint rows. Three torchrun launches in all (killed, resumed, distill)."""
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


def _signal_tree(pid: int, sig: int) -> None:
    """Signal torchrun and its ranks (torchrun starts each rank in a session of its own)."""
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
            os.kill(p, sig)
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


def _kill_after_a_checkpoint(p: subprocess.Popen, state, log, at: int, past: int = 3) -> tuple[int, int]:
    """SIGKILL the job once its checkpoint is at step >= `at` and it has logged `past` steps more
    (so the resumed run re-does steps the killed one logged). The job is frozen (SIGSTOP) while
    the condition is confirmed, so what was read is what the kill leaves. Returns (checkpoint
    step, last logged step)."""
    def where() -> tuple[int, int]:
        try:
            return json.loads(state.read_text())["step"], max(_losses(log))
        except (OSError, ValueError, KeyError):      # not written yet, being swapped in, or a line half written
            return 0, 0

    deadline = time.monotonic() + 200
    while p.poll() is None and time.monotonic() < deadline:
        step, logged = where()
        if step >= at and logged >= step + past:
            _signal_tree(p.pid, signal.SIGSTOP)
            step, logged = where()
            if step >= at and logged >= step + past:
                _signal_tree(p.pid, signal.SIGKILL)
                return step, logged
            _signal_tree(p.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"the run ended (or stalled) before it could be killed: {p.communicate(timeout=60)[0]}")


@pytest.fixture(scope="module")
def curves(world):
    """One process (100 steps) and ONE 2-rank job with the same global batch of 8, SIGKILLed after
    its checkpoint at step >= 20 and resumed to step 100: two torchrun launches give the 2-rank
    loss curve (the steps logged before the kill, then the resumed ones) and test the resume."""
    assert main(_train_args(world, "single")) == 0
    args = _train_args(world, "ddp", extra=["--checkpoint-every", "10"])
    p = _torchrun(args)
    killed_at, last_logged = _kill_after_a_checkpoint(p, world / "ddp" / "train_state" / "state.json",
                                                      world / "ddp.jsonl", at=20)
    first_out, _ = p.communicate(timeout=60)
    assert p.returncode != 0, "the job was not killed"
    before = [json.loads(line) for line in open(world / "ddp.jsonl")]
    q = _torchrun([*args, "--resume"])
    out, _ = q.communicate(timeout=240)
    assert q.returncode == 0, out
    after = [json.loads(line) for line in open(world / "ddp.jsonl")][len(before):]
    return dict(single=_losses(world / "single.jsonl"), before=before, after=after, killed_at=killed_at,
                last_logged=last_logged, out=first_out + out)


def test_two_ranks_reproduce_the_single_process_loss_curve(curves):
    single, out = curves["single"], curves["out"]
    ddp = {r["step"]: r["loss"] for r in curves["before"] + curves["after"]}   # the resumed value wins
    assert sorted(single) == sorted(ddp) == list(range(1, STEPS + 1))
    rel = max(abs(single[s] - ddp[s]) / single[s] for s in single)
    assert rel < 0.01, rel
    assert single[STEPS] < single[1] - 1.0          # it did learn
    assert "2 ranks (gloo)" in out and "2 ranks x 4 rows" in out
    assert out.count("train: 100 steps") == 1        # only rank 0 reports (the killed job never did)


def test_sigkill_then_resume_continues_from_the_last_checkpoint(world, curves):
    before = {r["step"]: r["loss"] for r in curves["before"]}
    after, killed_at = curves["after"], curves["killed_at"]
    assert max(before) == curves["last_logged"] < STEPS and killed_at % 10 == 0   # stopped mid-run, after a checkpoint
    steps = [r["step"] for r in after]
    assert steps == list(range(killed_at + 1, STEPS + 1))            # from the last checkpoint on, to the end
    redone = [r for r in after if r["step"] in before]
    assert len(redone) == curves["last_logged"] - killed_at >= 3     # the steps the killed job logged after it
    for r in redone:                                                 # re-done exactly as the killed job did them
        assert r["loss"] == pytest.approx(before[r["step"]], rel=1e-6)
    final = checkpoint.load_model_dir(world / "ddp").state_dict()   # ends where one process ends (to rounding)
    single = checkpoint.load_model_dir(world / "single").state_dict()
    gap = max(float((final[k] - single[k]).abs().max()) for k in final)
    assert gap < 1e-5, gap


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
