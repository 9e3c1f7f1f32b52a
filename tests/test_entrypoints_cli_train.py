"""`memlm train | distill | eval` end to end on tiny models and text (no embedded teacher), and
the flags -> typed run config step of the CLI."""
import argparse
from dataclasses import replace

import pytest
from helpers import tiny_teacher_world

from memlm.config import ModelConfig
from memlm.entrypoints.cli import train as cli
from memlm.entrypoints.cli.train import add_commands
from memlm.errors import MemlmError
from memlm.models import Transformer
from memlm.training import checkpoint
from memlm.training.data import TextTokenizer
from memlm.training.distill import DistillConfig
from memlm.training.runs import DISTILL_LOOP, ONLINE_LEARNER, TRAIN_LOOP, DistillRun, EvalRun, OnlineRun, TrainRun

pytest.importorskip("memlm.loading")
TEXT = "\n\n".join(f"Scene {i}. Enter the king and the queen; they speak of crowns, of {i} ships "
                   "and of the sea. Exeunt." for i in range(400))


def parse(argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(argv)


def run(argv):
    args = parse(argv)
    return args.func(args)


def test_flag_defaults_are_the_run_configs_defaults():
    assert cli.train_run(parse(["train"])) == TrainRun()
    assert cli.online_run(parse(["train", "--online", "--model", "m"])) == OnlineRun(model="m")
    assert cli.distill_run(parse(["distill"])) == DistillRun()
    assert cli.eval_run(parse(["eval", "--model", "m", "--text-file", "t"])) == EvalRun("m", "t")


def test_runs_built_from_flags_equal_runs_built_directly():
    args = parse(["train", "--student", "mini", "--corpus", "bible", "--steps", "7", "--seq-len", "32",
                  "--lr", "1e-3", "--schedule", "wsd", "--seed", "3", "--out", "o", "--resume", "--export-hf", "h"])
    assert cli.train_run(args) == TrainRun(student="mini", corpus="bible", out="o", resume=True, export_hf="h",
                                           loop=replace(TRAIN_LOOP, steps=7, seq_len=32, lr=1e-3, schedule="wsd",
                                                        seed=3))
    args = parse(["train", "--online", "--model", "m", "--stream", "s.txt", "--online-lr", "1e-3",
                  "--batch-size", "2", "--max-chunks", "3", "--replay-corpus", "bible"])
    assert cli.online_run(args) == OnlineRun(model="m", stream="s.txt", max_chunks=3, replay_corpus="bible",
                                             learner=replace(ONLINE_LEARNER, lr=1e-3, batch_size=2))
    args = parse(["distill", "--fit", "8MiB", "--weight-dtype", "bfloat16", "--temperature", "2", "--reverse-kl",
                  "--top-k", "8", "--no-cache", "--steps", "9"])
    built = DistillRun(fit="8MiB", weight_dtype="bf16", objective=DistillConfig(temperature=2.0, reverse=True),
                       top_k=8, no_cache=True, loop=replace(DISTILL_LOOP, steps=9))
    assert cli.distill_run(args) == built and built.weight_dtype == "bf16"
    args = parse(["eval", "--model", "m", "--text-file", "t", "--context", "64", "--stride", "32"])
    assert cli.eval_run(args) == EvalRun("m", "t", context=64, stride=32)


def test_bad_flags_fail_before_any_work(monkeypatch):
    def no_work(run):
        raise AssertionError("the run started")
    monkeypatch.setattr(cli, "run_distill", no_work)
    monkeypatch.setattr(cli, "run_train", no_work)
    with pytest.raises(MemlmError, match="--weight-dtype must be one of fp32, fp16, bf16, int8, int4"):
        run(["distill", "--fit", "8MiB", "--weight-dtype", "fp8"])
    with pytest.raises(MemlmError, match="--resume needs --out"):
        run(["train", "--resume"])


def test_threads_are_set_once_through_runtime(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.runtime, "set_num_threads", calls.append)
    monkeypatch.setattr(cli, "run_distill", lambda run: 0)
    monkeypatch.setattr(cli, "run_train", lambda run: 0)
    assert run(["distill", "--threads", "1"]) == 0 and run(["train"]) == 0
    assert calls == [1, None]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_teacher_world(tmp_path_factory.mktemp("cli"), TEXT)


def test_train_eval_resume(world, capsys):
    d = world
    common = ["--corpus", str(d / "corpus.txt"), "--data-dir", str(d / "data"), "--seq-len", "16",
              "--batch-size", "2", "--eval-every", "2", "--eval-tokens", "64", "--out", str(d / "student")]
    assert run(["train", "--tokenizer", str(d / "teacher"), "--student", "layers=2,hidden=32,heads=2,mixers=AR",
                "--steps", "2", *common]) == 0
    assert run(["train", "--tokenizer", str(d / "teacher"), "--student", "layers=2,hidden=32,heads=2,mixers=AR",
                "--steps", "4", "--resume", *common]) == 0
    out = capsys.readouterr().out
    assert "train: 4 steps" in out and "memlm generate --model" in out
    assert run(["eval", "--model", str(d / "student"), "--text-file", str(d / "corpus.txt"),
                "--context", "32", "--max-tokens", "200"]) == 0
    line = capsys.readouterr().out
    ppl = float(line.split("perplexity ")[1].split()[0])
    assert 1 < ppl < 300 and "199 tokens" in line


def test_distill_with_cache_and_plan(world, capsys):
    d = world
    assert run(["distill", "--teacher", str(d / "teacher"), "--student", "layers=2,hidden=16,heads=2",
                "--corpus", str(d / "corpus.txt"), "--data-dir", str(d / "data"), "--seq-len", "16",
                "--batch-size", "2", "--steps", "3", "--top-k", "4", "--eval-every", "3", "--eval-tokens", "64",
                "--out", str(d / "distilled")]) == 0
    out = capsys.readouterr().out
    assert "teacher cache" in out and "distill: 3 steps" in out
    from memlm.loading import load_model
    assert load_model(d / "distilled").config.hidden_size == 16
    assert run(["distill", "--teacher", str(d / "teacher"), "--fit", "2MiB", "--plan"]) == 0
    assert "picked student" in capsys.readouterr().out
    with pytest.raises(MemlmError, match="smaller than the smallest student"):
        run(["distill", "--teacher", str(d / "teacher"), "--fit", "10KiB", "--plan"])
    with pytest.raises(MemlmError, match="only one of"):
        run(["distill", "--teacher", str(d / "teacher"), "--fit", "2MiB", "--student", "tiny"])


def test_distill_refuses_other_tokenizer(world, tmp_path):
    tok = TextTokenizer.train(["completely different text " * 50], vocab_size=280)
    other = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_heads=2))
    checkpoint.save_model(other, tmp_path / "other", tok)
    with pytest.raises(MemlmError, match="tokenizer mismatch"):
        run(["distill", "--teacher", str(world / "teacher"), "--init", str(tmp_path / "other"), "--plan"])


def test_online_cli(world, capsys):
    d = world
    (d / "stream.txt").write_text(TEXT[:3000])
    assert run(["train", "--online", "--model", str(d / "teacher"), "--stream", str(d / "stream.txt"),
                "--chunk-chars", "1000", "--max-wait-s", "0", "--seq-len", "16", "--batch-size", "2",
                "--steps-per-chunk", "2", "--online-lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "test-then-train perplexity" in out and "chunk 2" in out
    with pytest.raises(MemlmError, match="needs --model"):
        run(["train", "--online"])


def test_eval_bad_inputs(world, tmp_path):
    with pytest.raises(MemlmError, match="does not exist"):
        run(["eval", "--model", str(world / "teacher"), "--text-file", str(tmp_path / "none.txt")])
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(MemlmError, match="too short"):
        run(["eval", "--model", str(world / "teacher"), "--text-file", str(tmp_path / "one.txt")])


def test_main_prints_one_error_line_for_bad_training_flags(capsys):
    from memlm.entrypoints.cli import main
    assert main(["distill", "--fit", "8MiB", "--weight-dtype", "fp8", "--plan"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --weight-dtype must be one of fp32, fp16, bf16, int8, int4") and err.count("\n") == 1
    assert main(["eval", "--model", "m", "--text-file", "t", "--stride", "0"]) == 1
    assert capsys.readouterr().err == "error: --stride must be in 1..context (512), got 0\n"
