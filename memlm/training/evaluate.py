"""Perplexity of a model on a text: sliding windows through `forward_dense`.

Owns: the windows that score a long token sequence with a bounded context (`windows`, also
used by `entrypoints/evaluate.py` through the engine) and scoring them with `forward_dense`. Does not know: how the model
or tokenizer were loaded (the CLI uses `memlm.loading.load_model`).

With context C and stride S (S <= C), window i covers tokens [i*S, i*S + C) and scores only the
tokens not scored by the previous window, so every token after the first is scored exactly once,
with at least C-S tokens of left context (the last window is aligned to the end):

    tokens   0 1 2 3 4 5 6 7 8 9
    win 0    [0 ....... 5]           scores 1..5
    win 1          [3 ...... 8]      scores 6..8   (C=6, S=3)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memlm.errors import MemlmError

CONTEXT = 512       # tokens of context per scored window
EVAL_CHUNK = 256    # prefill tokens per engine step when `memlm eval` scores through the engine


@dataclass(frozen=True)
class Perplexity:
    nll: float           # mean negative log-likelihood (nats/token)
    tokens: int          # tokens scored

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows scoring n tokens (module diagram): (start, end, first scored offset inside)."""
    jobs = []
    scored_to, start = 1, 0           # token 0 is never scored
    while scored_to < n:
        end = min(start + context, n)
        jobs.append((start, end, scored_to - start))
        scored_to = end
        # the next window starts at most at end-1, so its first scored token has context
        start = max(0, min(start + stride, end - 1, n - context))
    return jobs


@torch.inference_mode()
def perplexity(model, ids: list[int] | torch.Tensor, context: int = CONTEXT, stride: int | None = None,
               ) -> Perplexity:
    """Score ids[1:] given their prefixes (each with at most `context` tokens of context).

    Args:
        ids: (n,) token ids, n >= 2.
        stride: window step (default = context: non-overlapping windows).
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    stride = stride or context
    if len(ids) < 2:
        raise MemlmError("the text is too short to score: it needs at least 2 tokens")
    if not 0 < stride <= context:
        raise MemlmError(f"--stride must be in 1..context ({context}), got {stride}")
    context = min(context, getattr(model.cfg, "max_position_embeddings", context))
    stride = min(stride, context)
    model.eval()
    total, count = 0.0, 0
    for s, e, first in windows(len(ids), context, stride):
        x = ids[s:e][None]                                            # (1, L)
        h = model.forward_dense(x[:, :-1])                            # (1, L-1, H)
        h = h[0, first - 1:]                                          # rows predicting x[first:]
        logits = model.compute_logits(h)                              # (n, V)
        total += float(torch.nn.functional.cross_entropy(logits.float(), x[0, first:], reduction="sum"))
        count += e - s - first
    return Perplexity(total / count, count)
