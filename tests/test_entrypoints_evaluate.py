"""Perplexity through the paged engine (`memlm eval`) against transformers on the same windows."""

import json
import math

import pytest
import torch

import helpers

from memlm.entrypoints import evaluate
from memlm.errors import MemlmError
from memlm.training.evaluate import windows

TEXT = " ".join(helpers.CORPUS[:12])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return helpers.make_tiny_hf_llama(tmp_path_factory.mktemp("hf_eval"), seed=5)


def hf_perplexity(hf_dir, ids, context):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s, e, first in windows(len(ids), context, context):
            x = torch.tensor(ids[s:e])[None]
            logits = model(x).logits[0, first - 1:-1].float()                    # rows predicting x[first:]
            total += float(torch.nn.functional.cross_entropy(logits, x[0, first:], reduction="sum"))
            count += e - s - first
    return math.exp(total / count), count


def test_fp32_engine_perplexity_agrees_with_transformers(hf_dir):
    llm = evaluate.eval_llm(str(hf_dir), chunk=16, weight_dtype="fp32", kv_dtype="fp32")
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 3 * 48
    r = evaluate.perplexity(llm, ids, context=48, chunk=16)
    ref, count = hf_perplexity(hf_dir, ids, 48)
    assert r.tokens == count == len(ids) - 1 and r.windows == len(windows(len(ids), 48, 48))
    assert abs(r.perplexity / ref - 1) < 1e-3, (r.perplexity, ref)
    # chunk 16 < context 48: later chunks attended to K/V read back from the cache; a
    # single-chunk prefill (chunk 64) scores the same text to float rounding
    one = evaluate.perplexity(evaluate.eval_llm(str(hf_dir), chunk=64, weight_dtype="fp32", kv_dtype="fp32"),
                              ids, context=48)
    assert abs(one.perplexity / r.perplexity - 1) < 1e-4


@pytest.mark.parametrize("kv_dtype,tolerance", [("int8", 0.01), ("int4", 0.06), ("int2", 0.5)])
def test_compressed_kv_perplexity_stays_near_fp32(hf_dir, kv_dtype, tolerance):
    fp32 = evaluate.eval_llm(str(hf_dir), chunk=16, weight_dtype="fp32", kv_dtype="fp32")
    ids = fp32.tokenizer.encode(TEXT)
    base = evaluate.perplexity(fp32, ids, context=64)
    llm = evaluate.eval_llm(str(hf_dir), chunk=16, weight_dtype="fp32", kv_dtype=kv_dtype)
    r = evaluate.perplexity(llm, ids, context=64)
    assert llm.engine.runner.store.codec.name == kv_dtype
    assert r.tokens == base.tokens and r.perplexity != base.perplexity
    assert abs(r.perplexity / base.perplexity - 1) < tolerance, (r.perplexity, base.perplexity)


def test_eval_command_prints_json(hf_dir, tmp_path, capsys):
    from memlm.entrypoints.cli import main
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    assert main(["eval", "--model", str(hf_dir), "--text-file", str(text), "--context", "32", "--chunk", "8",
                 "--kv-dtype", "int4", "--weight-dtype", "fp32", "--max-tokens", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 99 and out["kv_dtype"] == "int4" and out["chunk"] == 8 and out["context"] == 32
    assert out["perplexity"] > 1 and math.isclose(out["perplexity"], math.exp(out["nll"]))


def test_eval_errors_are_one_line(hf_dir, tmp_path, capsys):
    from memlm.entrypoints.cli import main
    llm = evaluate.eval_llm(str(hf_dir), chunk=16, weight_dtype="fp32", kv_dtype="fp32")
    with pytest.raises(MemlmError, match="chunk 8 differs from the engine's max_num_batched_tokens 16"):
        evaluate.perplexity(llm, [1, 2, 3], chunk=8)
    with pytest.raises(MemlmError, match="too short"):
        evaluate.perplexity(llm, [1])
    assert main(["eval", "--model", str(hf_dir), "--text-file", str(tmp_path / "t.txt"), "--chunk", "0"]) == 1
    assert capsys.readouterr().err == "error: --chunk must be positive, got 0\n"
    assert main(["eval", "--model", str(hf_dir), "--text-file", str(tmp_path / "none.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err
