"""Perplexity through the paged engine: what `memlm eval` measures.

Owns: scoring a token sequence with an `LLM` the way it serves: each window is one request
whose prompt is prefilled in chunks of the engine's `max_num_batched_tokens` (so every chunk
after the first attends to K/V read back from the cache, in the cache's codec), its prompt
log-probabilities are the scores; `eval_llm` builds the LLM that does that with one window in
flight; `EvalResult` and its JSON.
Does not know: how windows are laid out (`training/evaluate.windows`, shared with the dense
path of `memlm train`), the engine's internals, or the command line (`cli/train.py`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from memlm.errors import MemlmError
from memlm.training.evaluate import CONTEXT, EVAL_CHUNK as CHUNK, windows


@dataclass(frozen=True)
class EvalResult:
    nll: float           # mean negative log-likelihood, nats per scored token
    tokens: int          # tokens scored
    windows: int
    context: int
    chunk: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, **asdict(self)}


def eval_llm(model, chunk: int = CHUNK, **llm_kwargs):
    """An `LLM` for `perplexity`: one window at a time, prefilled `chunk` tokens per step.

    Args:
        model: what `LLM` takes (a name, a path, a `LoadedModel`).
        llm_kwargs: the rest of `LLM`'s settings (memory_budget, kv_dtype, weight_dtype, ...).
    """
    from memlm.entrypoints.llm import LLM
    if chunk < 1:
        raise MemlmError(f"--chunk must be >= 1, got {chunk}")
    llm_kwargs.setdefault("verbose", False)
    return LLM(model, max_num_seqs=1, max_num_batched_tokens=chunk, **llm_kwargs)


def perplexity(llm, token_ids, context: int = CONTEXT, stride: int | None = None,
               chunk: int | None = None, kv_policy: dict | None = None) -> EvalResult:
    """Score token_ids[1:] through `llm`'s paged engine (each token given at most `context`
    tokens of its left context; windows as in `training/evaluate.py`).

    Args:
        llm: an `LLM` with the paged engine (`eval_llm` makes one).
        token_ids: (n,) ids, n >= 2.
        stride: window step (default = context).
        chunk: the prefill chunk the caller expects; must be the engine's
            max_num_batched_tokens (None: whatever it is).
        kv_policy: SamplingParams kv_* fields (`kv/policies.py`); with chunk 1 each token is a
            decode step, so the policy evicts as it would in generation. Under window / sinks a
            window may be longer than the model's context.
    """
    from memlm.sampling import SamplingParams
    ids = [int(t) for t in token_ids]
    config = getattr(llm.engine, "config", None)
    if config is None:
        raise MemlmError("perplexity through the engine needs LLM(engine='paged')")
    step = config.max_num_batched_tokens
    if chunk is not None and chunk != step:
        raise MemlmError(f"chunk {chunk} differs from the engine's max_num_batched_tokens {step}: "
                         "build the LLM with evaluate.eval_llm(model, chunk=...)")
    if len(ids) < 2:
        raise MemlmError("the text is too short to score: it needs at least 2 tokens")
    if context < 2:
        raise MemlmError(f"--context must be >= 2, got {context}")
    kv_policy = kv_policy or {}
    if kv_policy.get("kv_policy") not in ("window", "sinks"):
        context = min(context, llm.max_model_len)
    stride = min(stride or context, context)
    if stride < 1:
        raise MemlmError(f"--stride must be in 1..context ({context}), got {stride}")
    jobs = windows(len(ids), context, stride)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, ignore_eos=True, **kv_policy)
    outs = llm.generate([{"prompt_token_ids": ids[s:e]} for s, e, _ in jobs], params, use_tqdm=False)
    total, count = 0.0, 0
    for (s, e, first), out in zip(jobs, outs):
        if out.error:
            raise MemlmError(f"window {s}..{e} failed: {out.error}")
        lps = out.prompt_logprobs or []
        if len(lps) != e - s:
            raise MemlmError(f"the engine returned {len(lps)} prompt log-probabilities for a window of "
                             f"{e - s} tokens")
        for i in range(first, e - s):
            total -= lps[i][ids[s + i]]
        count += e - s - first
    return EvalResult(nll=total / count, tokens=count, windows=len(jobs), context=context, chunk=step)


def run(spec) -> int:
    """`memlm eval`: print the perplexity of `spec.model` (an `EvalRun`) on `spec.text_file`."""
    import json
    from pathlib import Path
    path = Path(spec.text_file)
    if not path.is_file():
        raise MemlmError(f"--text-file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    llm = eval_llm(spec.model, spec.chunk, memory_budget=spec.memory_budget, kv_dtype=spec.kv_dtype,
                   weight_dtype=spec.weight_dtype)
    ids = llm.tokenizer.encode(text)[:spec.max_tokens]
    r = perplexity(llm, ids, context=spec.context, stride=spec.stride, kv_policy=spec.kv_policy)
    kv, weights = llm.engine.kv_dtype, llm.weight_dtype
    if spec.json:
        print(json.dumps({**r.as_dict(), "model": spec.model, "text_file": str(path), "kv_dtype": kv,
                          "weight_dtype": weights, "stride": spec.stride or r.context}))
    else:
        print(f"{spec.model} on {path.name}: perplexity {r.perplexity:.3f} (nll {r.nll:.4f} nats/token "
              f"over {r.tokens} tokens, context {r.context}, stride {spec.stride or r.context}, chunk "
              f"{r.chunk}, kv {kv}, weights {weights})")
    return 0
