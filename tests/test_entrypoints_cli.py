"""`memlm generate --prompts-file` and `memlm info --memory-budget` on a tiny HF checkpoint."""
import json
import sys

from helpers import make_tiny_hf_llama

from memlm.entrypoints.cli import main


def test_prompts_file_to_jsonl(tmp_path, capsys):
    model = make_tiny_hf_llama(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('Hello world\n\n{"prompt": "The quick brown fox", "max_tokens": 2}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--prompts-file", str(prompts), "--model", str(model), "--max-tokens", "5",
               "--memory-budget", "4GiB", "--output", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello world", "The quick brown fox"]
    assert len(rows[0]["token_ids"]) <= 5 and len(rows[1]["token_ids"]) <= 2
    assert all(r["finish_reason"] in ("stop", "length") and isinstance(r["text"], str) for r in rows)
    assert "requests; KV blocks" in capsys.readouterr().err


def test_prompts_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "temprature": 1}\n')
    assert main(["generate", "--prompts-file", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "temprature" in err and "\n" not in err
    assert main(["generate", "--prompts-file", str(tmp_path / "missing.txt")]) == 1


def test_info_prints_memory_plan(tmp_path, capsys):
    model = make_tiny_hf_llama(tmp_path / "model")
    assert main(["info", "--model", str(model), "--memory-budget", "3GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and "KV blocks" in out


def test_too_small_budget_fails_at_once_with_needed_size(tmp_path, capsys):
    model = make_tiny_hf_llama(tmp_path / "model")
    assert main(["generate", "hi", "--model", str(model), "--memory-budget", "100MiB"]) == 1
    err = capsys.readouterr().err
    assert "error: memory budget" in err and "use at least" in err


def test_bench_passes_its_options_to_the_benchmark(capfd):
    """`memlm bench --long ...` reaches benchmarks/throughput.py (argparse alone refused a first
    argument that looks like an option)."""
    assert main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert "Offline throughput" in out and "--long" in out and "--quick" in out


def test_commands_size_the_engine_for_the_sequences_they_run(tmp_path, monkeypatch):
    """One prompt or a chat runs one sequence: the engine is not built for 128 (the default
    budget would otherwise turn into a multi-GiB KV pool); a prompts file gets its count, and
    --max-num-seqs always wins."""
    import memlm.entrypoints.llm

    seen = []

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):
        seen.append(kwargs.get("max_num_seqs"))
        raise Stop

    monkeypatch.setattr(memlm.entrypoints.llm, "LLM", fake_llm)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "n": 3}\nc\n')
    for argv in (["generate", "hi"], ["chat"], ["generate", "--prompts-file", str(prompts)],
                 ["generate", "hi", "--max-num-seqs", "7"]):
        try:
            main(argv)
        except Stop:
            pass
    assert seen == [1, 1, 5, 7]


def test_dtype_flags_speak_the_one_vocabulary_and_help_reads_the_defaults(monkeypatch, capsys):
    import pytest

    import memlm.entrypoints.llm
    from memlm.engine import config
    from memlm.entrypoints.cli import build_parser

    seen = []

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):
        seen.append((kwargs.get("kv_dtype"), kwargs.get("weight_dtype")))
        raise Stop

    monkeypatch.setattr(memlm.entrypoints.llm, "LLM", fake_llm)
    for argv in (["generate", "hi", "--kv-dtype", "float16", "--weight-dtype", "bfloat16"],
                 ["generate", "hi", "--kv-dtype", "int8", "--dtype", "fp32"], ["chat"]):
        try:
            main(argv)
        except Stop:
            pass
    assert seen == [("float16", "bfloat16"), ("int8", "fp32"), (None, None)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--kv-dtype", "int3"])
    assert "--kv-dtype" in capsys.readouterr().err
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split())
    assert f"default {config.MAX_NUM_SEQS}" in help_text
    assert f"default {config.MAX_NUM_BATCHED_TOKENS}" in help_text
    assert "{auto,fp32,fp16,bf16,int8,int4,int2}" in help_text and "{auto,fp32,bf16,int8,int4}" in help_text


def test_serve_steps_are_smaller_by_default_and_the_flag_wins():
    """`memlm serve` defaults to SERVE_MAX_NUM_BATCHED_TOKENS tokens a step (first tokens of
    simultaneous requests sooner); the other commands keep the engine's default; a flag wins."""
    from memlm.engine import config
    from memlm.entrypoints.cli import args as args_mod, build_parser

    serve = build_parser().parse_args(["serve"])
    assert args_mod.engine_kwargs(serve)["max_num_batched_tokens"] == config.SERVE_MAX_NUM_BATCHED_TOKENS
    assert config.SERVE_MAX_NUM_BATCHED_TOKENS < config.MAX_NUM_BATCHED_TOKENS
    generate = build_parser().parse_args(["generate", "hi"])
    assert "max_num_batched_tokens" not in args_mod.engine_kwargs(generate)
    flagged = build_parser().parse_args(["serve", "--max-num-batched-tokens", "1024"])
    assert args_mod.engine_kwargs(flagged)["max_num_batched_tokens"] == 1024
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert f"(default {config.SERVE_MAX_NUM_BATCHED_TOKENS})" in help_text
