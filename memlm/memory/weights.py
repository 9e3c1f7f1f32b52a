"""Weight storage codec: bf16 weights and matmuls, everything else in fp32.

Owns: turning a loaded model's `nn.Linear` / `nn.Embedding` layers (and the LM head) into bf16
storage whose matmuls take bf16 inputs and give fp32 outputs. The residual stream, norms,
attention and sampling stay fp32, which keeps greedy outputs close to the fp32 reference
(a bf16 residual stream is what hurts small models). Halves weight memory; on CPUs with AMX
bf16 matmuls run ~5x faster than fp32 (measured by `runner.bf16_matmul_is_fast`).
Does not know: which model it is; it rewrites modules in place, so models stay unaware.
Switch it off with `LLM(dtype="float32")`.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F


def row_bucket(m: int) -> int:
    """Rows a bf16 matmul is padded to: 1, 2, 4, ..., 64, then multiples of 64.

    oneDNN keeps state for every distinct matmul shape it has seen (~0.7 MiB per row count per
    weight, measured), so unpadded row counts 1..640 would grow RSS by hundreds of MiB behind
    the budget's back. Buckets bound the shapes to ~20 per weight; `warm_up` creates them all
    during the engine's profile step, where the budget measures them.
    """
    if m <= 64:
        return 1 << max(0, (m - 1).bit_length())
    return -(-m // 64) * 64


def _padded_bf16(x: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (row_bucket(M), K) bf16, zero rows appended."""
    m = x.shape[0]
    xb = x.to(torch.bfloat16)
    pad = row_bucket(m) - m
    return F.pad(xb, (0, 0, 0, pad)) if pad else xb


class _CastCache:
    """The padded bf16 copy of the last input: q/k/v (and gate/up) projections read the same
    x, so it is cast once, not three times. Holds one tensor; compared by identity."""

    def __init__(self):
        self.src: torch.Tensor | None = None
        self.bf16: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.src:
            self.src, self.bf16 = x, _padded_bf16(x)
        return self.bf16


class Bf16Linear(nn.Module):
    """y = x @ W^T + b with W stored in bf16; x cast to bf16 for the matmul, y returned fp32."""

    def __init__(self, linear: nn.Linear, cast: _CastCache):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = (None if linear.bias is None
                     else nn.Parameter(linear.bias.detach().float(), requires_grad=False))
        self._cast = cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])                               # (M, K)
        y = F.linear(self._cast(x2), self.weight)[:x2.shape[0]].float()  # (M, N)
        y = y if self.bias is None else y + self.bias
        return y.view(*lead, y.shape[-1])


class Bf16Embedding(nn.Module):
    """A lookup table stored in bf16 that returns fp32 rows."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.weight = nn.Parameter(emb.weight.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


def _bf16_logits(self, hidden: torch.Tensor) -> torch.Tensor:
    """(n, H) fp32 -> (n, vocab) fp32 logits through the bf16 LM head."""
    return F.linear(_padded_bf16(hidden), self.lm_head_weight)[:hidden.shape[0]].float()


def warm_up(model: nn.Module, max_rows: int) -> None:
    """Run every bf16 weight shape at every row bucket up to `max_rows` once (see row_bucket)."""
    weights = {tuple(m.weight.shape): m.weight for m in model.modules() if isinstance(m, Bf16Linear)}
    head = getattr(model, "lm_head_weight", None)
    if head is not None and head.dtype == torch.bfloat16:
        weights[tuple(head.shape)] = head
    if not weights:
        return
    buckets = sorted({row_bucket(m) for m in range(1, max_rows + 1)})
    with torch.inference_mode():
        for w in weights.values():
            for b in buckets:
                F.linear(torch.zeros(b, w.shape[1], dtype=torch.bfloat16), w)


def use_bf16_matmuls(model: nn.Module) -> nn.Module:
    """Rewrite `model` in place (see the module docstring); returns it."""
    cast = _CastCache()
    # Keep only (parent, name) pairs, never the old layers themselves, so each fp32 weight is
    # freed as soon as its bf16 copy exists: peak = fp32 model + one layer, not fp32 + bf16.
    slots = [(m, name) for m in model.modules() for name, child in m.named_children()
             if isinstance(child, (nn.Linear, nn.Embedding))]
    for parent, name in slots:
        child = getattr(parent, name)
        new = Bf16Linear(child, cast) if isinstance(child, nn.Linear) else Bf16Embedding(child)
        del child
        setattr(parent, name, new)
    with torch.no_grad():                      # norms, biases, anything else: fp32
        for mod in model.modules():
            if isinstance(mod, (Bf16Linear, Bf16Embedding)):
                continue
            for pname, p in list(mod.named_parameters(recurse=False)):
                if p.dtype != torch.float32:
                    setattr(mod, pname, nn.Parameter(p.detach().float(), requires_grad=False))
    model.compute_logits = types.MethodType(_bf16_logits, model)
    return model
