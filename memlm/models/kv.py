"""The one small interface between a model and its cache, plus the two reference caches.

Owns: `KVView` (what a model may ask of a cache) and two implementations that need no paging:
`DenseView` (training / scoring: B sequences of equal length, no cache kept) and
`ContiguousCache` (the reference generation path: one sequence, K/V kept in one tensor per layer).
Does not know: block tables, budgets or scheduling — the paged engine supplies its own view
(`memlm.kv.store`) with the same two methods.

Tokens travel flattened: a step's inputs are N tokens (all sequences concatenated), so
`q` is (N, n_heads, head_dim) and `k`, `v` are (N, n_kv_heads, head_dim).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class KVView(Protocol):
    def attend(self, depth: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k/v for layer `depth`, attend q over everything visible.

        Args: q (N, n_heads, hd); k, v (N, n_kv_heads, hd). Returns (N, n_heads, hd).
        """

    def recurrent(self, depth: int, x: torch.Tensor, cell) -> torch.Tensor:
        """Run `cell.scan` over each sequence's tokens, carrying the fixed-size state.

        Args: x (N, C). Returns (N, C).
        """


# SDPA's CPU flash kernel runs up to 2x slower when the key count is not a multiple of 16
# (`benchmarks/prefill.py`); zero keys past every query's position cost less than that.
KEY_ALIGN = 16


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """Attention of queries at positions q_offset.. over keys at 0..; GQA by head grouping.

    Args: q (B, nh, T, hd); k, v (B, nkv, L, hd) with L >= q_offset + T: keys past the last
    query's position (e.g. the unused tail of a sequence's last KV block) are never attended.
    Returns (B, nh, T, hd).
    """
    T, L = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == 1 and L == q_offset + 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    pad = (-L) % KEY_ALIGN if q.device.type == "cpu" and L > KEY_ALIGN else 0
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    if q_offset == 0 and T == L:      # causal from the top-left: the padded keys are never seen
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    qpos = torch.arange(q_offset, q_offset + T, device=q.device)
    mask = torch.arange(L + pad, device=q.device)[None, :] <= qpos[:, None]  # (T, L + pad)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class DenseView:
    """B sequences of T tokens each, laid out row-major in the flattened inputs; no cache kept.

    Used for training and for scoring whole texts.
    """

    def __init__(self, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len

    def attend(self, depth, q, k, v):
        B, T = self.batch, self.seq_len
        q = q.view(B, T, *q.shape[1:]).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, *k.shape[1:]).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, *v.shape[1:]).transpose(1, 2)
        out = causal_attention(q, k, v)
        return out.transpose(1, 2).reshape(B * T, out.shape[1], out.shape[3])

    def recurrent(self, depth, x, cell):
        y, _ = cell.scan(x.view(self.batch, self.seq_len, -1), None)
        return y.reshape(self.batch * self.seq_len, -1)


class ContiguousCache:
    """One sequence's cache: K/V of every attention layer in a preallocated tensor.

    The reference path: simple and obviously correct, the oracle the paged engine is tested
    against. Tokens must arrive in order (positions length, length+1, ...).
    """

    def __init__(self, n_kv_heads: int, head_dim: int, depth: int, max_len: int,
                 dtype=torch.float32, device="cpu"):
        self.max_len = max_len
        self.length = 0          # tokens already stored
        self._pending = 0        # tokens added by the step in flight
        self.k = [None] * depth
        self.v = [None] * depth
        self.state = [None] * depth
        self._shape = (n_kv_heads, max_len, head_dim)
        self._dtype, self._device = dtype, device

    def begin_step(self, n_tokens: int) -> None:
        if self.length + n_tokens > self.max_len:
            raise ValueError(f"sequence of {self.length + n_tokens} tokens exceeds the cache's {self.max_len}")
        self._pending = n_tokens

    def end_step(self) -> None:
        self.length += self._pending
        self._pending = 0

    def attend(self, depth, q, k, v):
        if self.k[depth] is None:
            self.k[depth] = torch.empty(self._shape, dtype=self._dtype, device=self._device)
            self.v[depth] = torch.empty(self._shape, dtype=self._dtype, device=self._device)
        T, start = q.shape[0], self.length
        self.k[depth][:, start:start + T] = k.transpose(0, 1)  # (nkv, T, hd)
        self.v[depth][:, start:start + T] = v.transpose(0, 1)
        keys = self.k[depth][None, :, :start + T]  # (1, nkv, L, hd)
        vals = self.v[depth][None, :, :start + T]
        # The cache keeps the model's dtype; a bf16-matmul model hands in bf16 q/k/v (stored
        # widened, attended in the cache's dtype, returned in v's dtype like the paged view).
        q = q.transpose(0, 1)[None].to(keys.dtype)
        out = causal_attention(q, keys, vals, q_offset=start)  # (1, nh, T, hd)
        return out[0].transpose(0, 1).to(v.dtype)

    def recurrent(self, depth, x, cell):
        y, self.state[depth] = cell.scan(x[None], self.state[depth])
        return y[0]
