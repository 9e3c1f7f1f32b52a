"""Ray Data batch inference (`memlm.distributed.ray_data`) on a local Ray (num_cpus=2, one per
module): `memlm generate --prompts-file F --ray --actors 2` writes token-for-token the JSONL of
`memlm generate` without Ray, in the input order; score mode over `map_batches` matches the
log-probabilities of the transformers model the checkpoint came from; bad flags are one-line
errors; without ray, --ray says how to install it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import make_tiny_hf_llama

from memlm.entrypoints.cli import main
from memlm.errors import MemlmError

PROMPTS = ["The quick brown fox", "Hello world", '{"prompt": "memlm runs 1234", "max_tokens": 5}',
           '{"messages": [{"role": "user", "content": "hi"}]}', "numbers and words",
           '{"prompt": "lazy dog", "stop": ["o"]}', "1234 5678"]
FLAGS = ["--threads", "1", "--weight-dtype", "fp32", "--memory-budget", "700MiB", "--max-tokens", "12"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return f


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_two_actors_match_memlm_generate(ray_cluster, model_dir, prompts_file, tmp_path):
    plain, distributed = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    # The plain run in its own process: this one has imported the whole suite (ray, flwr, ...),
    # so its runtime baseline is above FLAGS' budget; each Ray actor is a fresh process too.
    subprocess.run([sys.executable, "-m", "memlm", "generate", "--model", str(model_dir), "--prompts-file",
                    str(prompts_file), "-o", str(plain), *FLAGS], check=True, timeout=300)
    assert main(["generate", "--model", str(model_dir), "--prompts-file", str(prompts_file),
                 "-o", str(distributed), *FLAGS, "--ray", "--actors", "2", "--actor-cpus", "0.5",
                 "--batch-size", "2"]) == 0
    want, got = _rows(plain), _rows(distributed)
    assert len(want) == len(PROMPTS) and all(r["token_ids"] for r in want)
    assert [r["prompt"] for r in got] == [r["prompt"] for r in want]     # the input order
    assert got == want                                                   # token for token
    assert len(want[2]["token_ids"]) <= 5                                # the per-line override held


def test_score_mode_matches_transformers(ray_cluster, model_dir):
    import ray.data
    import transformers

    from memlm.distributed.ray_data import MemlmPredictor
    from tokenizers import Tokenizer
    pairs = [("The quick brown", " fox jumps"), ("Hello", " world, héllo"), ("memlm runs", " 1234"),
             ("numbers and", " words")]
    ds = ray.data.from_items([{"prompt": p, "continuation": c} for p, c in pairs], override_num_blocks=2)
    out = ds.map_batches(MemlmPredictor, fn_constructor_kwargs={
        "model": str(model_dir), "mode": "score", "memory_budget": "700MiB", "weight_dtype": "fp32"},
        concurrency=2, batch_size=2, num_cpus=0.5).take_all()
    got = {(r["prompt"], r["continuation"]): r for r in out}
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tk = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for p, c in pairs:
        context, target = tk.encode(p).ids, tk.encode(c).ids
        with torch.no_grad():
            logits = hf(torch.tensor([context + target])).logits[0].float().log_softmax(-1)
        rows = logits[len(context) - 1:-1]
        want = float(rows[torch.arange(len(target)), torch.tensor(target)].sum())
        greedy = bool((rows.argmax(-1) == torch.tensor(target)).all())
        r = got[(p, c)]
        assert r["num_tokens"] == len(target)
        assert abs(r["logprob"] - want) < 1e-3 * max(1.0, abs(want)), (p, c, r["logprob"], want)
        assert bool(r["is_greedy"]) == greedy


def test_bad_flags_are_one_line_errors(model_dir, prompts_file, capsys):
    assert main(["generate", "Hello", "--model", str(model_dir), "--ray"]) == 1
    assert "--ray and --actors need --prompts-file" in capsys.readouterr().err
    pytest.importorskip("ray")
    assert main(["generate", "--model", str(model_dir), "--prompts-file", str(prompts_file),
                 "--ray", "--actors", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --actors must be >= 1, got 0"]


def test_without_ray_says_how_to_install(monkeypatch, model_dir, prompts_file, capsys):
    from memlm.distributed import ray_data
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MemlmError, match=r"memlm\[distributed\]"):
        ray_data.require_ray_data()
    assert main(["generate", "--model", str(model_dir), "--prompts-file", str(prompts_file),
                 "--ray", "--actors", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'memlm[distributed]'" in err[0]
