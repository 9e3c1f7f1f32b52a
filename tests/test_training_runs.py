"""Typed run configs: their one-line validation errors, one dtype vocabulary for --fit and
checkpoints, and the import boundary (training never imports the entrypoints)."""
import ast
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest
import torch

import memlm.training
from memlm.config import ModelConfig
from memlm.errors import MemlmError
from memlm.models import Transformer
from memlm.training import checkpoint
from memlm.training.runs import (DISTILL_LOOP, ONLINE_LEARNER, TRAIN_LOOP, DistillRun, EvalRun, OnlineRun,
                                 TrainRun)
from memlm.training.students import FIT_DTYPES, count_parameters, fit_student, parse_weight_dtype


@pytest.mark.parametrize("make,msg", [
    (lambda: TrainRun(resume=True), "--resume needs --out"),
    (lambda: TrainRun(val_fraction=1.0), r"--val-fraction must be in \[0, 1\), got 1.0"),
    (lambda: TrainRun(tokenizer="bpe:many"), "bpe:N needs a vocabulary size"),
    (lambda: TrainRun(loop=replace(TRAIN_LOOP, steps=0)), "--steps must be positive, got 0"),
    (lambda: DistillRun(fit="2MiB", student="tiny"), r"give only one of --fit, --student, --init \(got --fit and --student\)"),
    (lambda: DistillRun(weight_dtype="fp8"), "--weight-dtype must be one of fp32, fp16, bf16, int8, int4"),
    (lambda: DistillRun(top_k=0), "--top-k must be positive, got 0"),
    (lambda: DistillRun(fit_context=-1), "--fit-context must be positive"),
    (lambda: DistillRun(teacher_windows=0), "--teacher-windows must be positive"),
    (lambda: DistillRun(resume=True), "--resume needs --out"),
    (lambda: OnlineRun(), "--online needs --model"),
    (lambda: OnlineRun(model="m", chunk_chars=0), "--chunk-chars must be positive"),
    (lambda: OnlineRun(model="m", max_chunks=0), "--max-chunks must be positive"),
    (lambda: OnlineRun(model="m", max_wait_s=-1), "--max-wait-s must be >= 0"),
    (lambda: EvalRun("m", "t", context=0), "--context must be positive, got 0"),
    (lambda: EvalRun("m", "t", context=8, stride=9), r"--stride must be in 1..context \(8\), got 9"),
    (lambda: EvalRun("m", "t", max_tokens=0), "--max-tokens must be positive"),
])
def test_bad_runs_fail_with_one_line(make, msg):
    with pytest.raises(MemlmError, match=msg) as e:
        make()
    assert "\n" not in str(e.value)


def test_run_defaults_are_the_commands_defaults():
    assert TrainRun().loop == TRAIN_LOOP and (TRAIN_LOOP.steps, TRAIN_LOOP.seq_len, TRAIN_LOOP.lr) == (500, 256, 3e-3)
    assert DistillRun().loop == DISTILL_LOOP and DISTILL_LOOP == replace(TRAIN_LOOP, lr=2e-3)
    assert OnlineRun(model="m").learner == ONLINE_LEARNER
    assert (ONLINE_LEARNER.lr, ONLINE_LEARNER.replay_fraction, ONLINE_LEARNER.seq_len) == (1e-5, 0.875, 256)
    assert (EvalRun("m", "t").context, DistillRun().top_k, DistillRun().fit_context) == (512, 32, 2048)
    with pytest.raises(FrozenInstanceError):
        TrainRun().corpus = "bible"


@pytest.mark.parametrize("alias,name", [("fp32", "fp32"), ("float32", "fp32"), ("FLOAT16", "fp16"),
                                        ("bfloat16", "bf16"), ("int8", "int8"), ("int4", "int4")])
def test_weight_dtype_takes_the_one_vocabulary(alias, name):
    assert DistillRun(weight_dtype=alias).weight_dtype == name
    assert parse_weight_dtype(alias) == name


def test_weight_dtype_refuses_what_fit_cannot_assume():
    assert FIT_DTYPES == ("fp32", "fp16", "bf16", "int8", "int4")
    for bad in ("int2", "fp8", "auto"):
        with pytest.raises(MemlmError, match="--weight-dtype must be one of"):
            parse_weight_dtype(bad)


def test_fit_bytes_per_weight_follow_dtypes():
    fp32, _ = fit_student("64MiB", 49152, weight_dtype="float32")
    assert fp32 == fit_student("64MiB", 49152, weight_dtype="fp32")[0]
    bf16, cands = fit_student("64MiB", 49152, weight_dtype="bf16")
    assert all(c.weight_bytes == 2 * count_parameters(c.cfg) for c in cands)
    int4, cands = fit_student("64MiB", 49152, weight_dtype="int4")
    assert all(c.weight_bytes == count_parameters(c.cfg) // 2 for c in cands)
    assert count_parameters(int4.cfg) > count_parameters(bf16.cfg) > count_parameters(fp32.cfg)


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", torch.bfloat16])
def test_save_model_dtype_takes_the_one_vocabulary(tmp_path, dtype):
    from safetensors.torch import load_file
    model = Transformer(ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16))
    checkpoint.save_model(model, tmp_path / "m", dtype=dtype)
    assert {t.dtype for t in load_file(str(tmp_path / "m" / "model.safetensors")).values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="checkpoint dtype must be one of fp32, fp16, bf16"):
        checkpoint.save_model(model, tmp_path / "n", dtype="int4")


def test_training_imports_nothing_from_entrypoints():
    """memlm.training is a library: the CLI imports it, never the other way round (lazy imports included)."""
    found = []
    for path in sorted(Path(memlm.training.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names if n.startswith(("memlm.entrypoints", "memlm.cli"))]
    assert found == []


def test_lazy_exports_resolve():
    for name in memlm.training.__all__:
        assert getattr(memlm.training, name) is not None
