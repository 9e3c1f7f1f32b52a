"""`memlm generate --prompts-file` and `memlm info --memory-budget` on a tiny HF checkpoint."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_fakes import one_torch_thread  # noqa: E402,F401  (autouse)
from helpers import make_tiny_hf_llama  # noqa: E402

from memlm.cli import main  # noqa: E402


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
    import memlm.llm

    seen = []

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):
        seen.append(kwargs.get("max_num_seqs"))
        raise Stop

    monkeypatch.setattr(memlm.llm, "LLM", fake_llm)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "n": 3}\nc\n')
    for argv in (["generate", "hi"], ["chat"], ["generate", "--prompts-file", str(prompts)],
                 ["generate", "hi", "--max-num-seqs", "7"]):
        try:
            main(argv)
        except Stop:
            pass
    assert seen == [1, 1, 5, 7]
