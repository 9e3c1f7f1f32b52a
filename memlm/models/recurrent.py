"""The recurrent mixer: a gated linear recurrence with a fixed-size state per sequence.

Owns: its math (a chunked parallel scan). Does not know: where the state lives between steps
(it is handed one by `kv.recurrent`) or how its projections store weights (`memlm.models.linear`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.config import ModelConfig
from memlm.models.linear import Linear, LinearMethod, default_method


class RecurrentMixer(nn.Module):
    """A gated linear recurrence (minGRU-style) with a fixed-size state per sequence.

        a_t = sigmoid(W_a x_t)           forget gate, per channel
        h_t = a_t * h_{t-1} + (1 - a_t) * W_x x_t
        y_t = W_o (h_t * silu(W_g x_t))

    The state is one vector of `hidden_size` per sequence regardless of length, so a
    recurrent layer needs no KV cache.
    """

    def __init__(self, cfg: ModelConfig, method: LinearMethod | None = None, init: bool = True):
        super().__init__()
        method = method or default_method()
        H = cfg.hidden_size
        self.in_proj = Linear(H, 3 * H, True, method, init)   # -> gate logits, candidate, output gate
        self.out_proj = Linear(H, H, False, method, init)

    def process_weights(self, method: LinearMethod) -> None:
        """Nothing to fuse: `DecoderLayer.process_weights` converts both projections."""

    def scan(self, x: torch.Tensor, state: torch.Tensor | None):
        """x (B, T, H), state (B, H) or None -> y (B, T, H), final state (B, H)."""
        B, T, H = x.shape
        a_logit, cand, gate = self.in_proj(x).chunk(3, dim=-1)
        a = torch.sigmoid(a_logit)
        b = (1 - a) * cand                                  # (B, T, H)
        h = x.new_zeros(B, H) if state is None else state
        # Chunked parallel form: inside a chunk h_t = P_t * (h0 + cumsum(b_s / P_s)) with
        # P_t = prod a; chunks of 16 keep 1/P_s well inside fp32 range (a >= sigmoid(-inf)
        # is clamped).
        log_a = torch.log(a.clamp_min(1e-4))
        outs = []
        for s in range(0, T, 16):
            la = log_a[:, s:s + 16].cumsum(dim=1)           # (B, c, H)
            P = la.exp()
            hs = P * (h[:, None, :] + (b[:, s:s + 16] * (-la).exp()).cumsum(dim=1))
            outs.append(hs)
            h = hs[:, -1]
        hseq = torch.cat(outs, dim=1)
        y = self.out_proj(hseq * F.silu(gate))
        return y, h

    def forward(self, x, depth: int, kv, rope=None):
        return kv.recurrent(depth, x, self)
