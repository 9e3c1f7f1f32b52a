"""A small budget shrinks the engine's step instead of refusing, and the refusal below the
smallest budget names one that really runs (checked by running it)."""
import re
import subprocess
import sys

import pytest

from engine_fakes import llama_config, tiny_loaded
from memlm import LLM, SamplingParams
from memlm.engine.config import MAX_NUM_BATCHED_TOKENS
from memlm.memory import budget as mem
from memlm.memory.plan import ALLOCATOR_SLACK


def test_large_budget_keeps_the_configured_step():
    llm = LLM(tiny_loaded(llama_config()), memory_budget="16GiB", verbose=False)
    cfg = llm.engine.config
    assert (cfg.max_num_batched_tokens, cfg.max_num_seqs) == (MAX_NUM_BATCHED_TOKENS, 128)
    assert (llm.engine.plan.step_tokens, llm.engine.plan.step_seqs) == (MAX_NUM_BATCHED_TOKENS, 128)


def test_small_budget_shrinks_the_step_logs_it_and_generates(monkeypatch, capsys):
    monkeypatch.setenv("MEMLM_TRIM_TEXT", "0")          # keep RSS still while the budget is set
    loaded = tiny_loaded(llama_config())
    ref = LLM(tiny_loaded(llama_config()), memory_budget="16GiB", verbose=False)
    est = ref.engine.runner.estimate_step_bytes
    want = (est(256, 16, 1024) + est(512, 32, 1024)) // 2      # room for 256-token steps, not 512
    kv_min = 16 * ref.engine.plan.block_bytes
    total = int((want + mem.current_rss() + mem.MIN_MARGIN + kv_min) / (1 - ALLOCATOR_SLACK))
    llm = LLM(loaded, memory_budget=total, verbose=True)
    cfg = llm.engine.config
    assert cfg.max_num_batched_tokens < MAX_NUM_BATCHED_TOKENS and cfg.max_num_seqs < 128
    assert llm.engine.plan.step_tokens == cfg.max_num_batched_tokens
    assert llm.engine.scheduler.config.max_num_batched_tokens == cfg.max_num_batched_tokens
    assert f"running steps of {cfg.max_num_batched_tokens} tokens x {cfg.max_num_seqs}" in capsys.readouterr().err
    prompt = {"prompt_token_ids": [3 + i % 250 for i in range(2 * cfg.max_num_batched_tokens + 5)]}  # chunked
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == \
        ref.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


def _chat(budget: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memlm", "generate", "--chat", "What is the capital of France?",
                           "--max-tokens", "8", "--memory-budget", budget], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_the_refusal_names_a_budget_that_completes_a_chat_reply():
    """SmolLM2 at 320 MiB: the plan refuses and names the smallest size it computed; a chat
    reply then completes inside that size."""
    run = _chat("320MiB")
    assert run.returncode == 1
    err = run.stderr.strip().splitlines()[-1]
    m = re.search(r"use --memory-budget (\d+)MiB", err)
    assert err.startswith("error: ") and m, err
    named = int(m.group(1))
    assert named <= 448, err                         # the target for Q4_1 is 384 MiB
    ok = _chat(f"{named}MiB")
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr


def test_the_warm_up_runs_the_lm_head_only_at_rows_it_can_sample(monkeypatch):
    """The head sees the sampled rows (max_num_seqs) or 64-row chunks of prompt logprobs, never a
    whole step: warming it at 2048 rows was a transient of the (rows, vocab) logits for nothing
    (55 MiB on SmolLM2 at 512 rows), while the other weights still warm at every step size."""
    from memlm.engine.runner import LOGPROB_CHUNK
    from memlm.kernels.cpu import row_bucket
    from memlm.models.linear import set_weight_dtype
    from memlm.models.transformer import Transformer
    loaded = tiny_loaded(llama_config())
    set_weight_dtype(loaded.model, "bf16")
    head_rows, body_rows = [], []
    logits, forward = Transformer.compute_logits, type(loaded.model.layers[0].mlp.down_proj).forward
    monkeypatch.setattr(Transformer, "compute_logits",
                        lambda self, h: (head_rows.append(h.shape[0]), logits(self, h))[1])
    monkeypatch.setattr(type(loaded.model.layers[0].mlp.down_proj), "forward",
                        lambda self, x: (body_rows.append(x.shape[0]), forward(self, x))[1])
    LLM(loaded, memory_budget="16GiB", verbose=False, max_num_seqs=8)
    assert max(body_rows) >= MAX_NUM_BATCHED_TOKENS
    assert head_rows and max(head_rows) == row_bucket(max(8, LOGPROB_CHUNK)), sorted(set(head_rows))
