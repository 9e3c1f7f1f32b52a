"""The fp32 linear method: plain `F.linear` / `F.embedding` on the weights as loaded.

Owns: the default format, which training, checkpoints and the reference path use. The math
runs in the parameters' own dtype (fp32 unless a loader was asked to store them otherwise).
Does not know: fusing or prepacking (`bf16.py`); it keeps q/k/v and gate/up apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memlm.models.linear.base import Embedding, Linear, LinearMethod, register


@register
class Fp32Method(LinearMethod):
    name = "fp32"

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def embed(self, emb: Embedding, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, emb.weight)

    def logits(self, head: Linear | Embedding, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, head.weight)
