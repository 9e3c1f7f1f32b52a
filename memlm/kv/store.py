"""The tensors behind KV block ids, and the paged `KVView` the model attends through.

Owns: `KVStore` (one preallocated K and V tensor per attention layer, indexed by
block id * block_size + offset = slot), `PagedBatch` (the per-step layout: slot mapping,
prefill segments, decode groups) and `PagedView` (the `KVView` protocol over them).
Does not know: which sequence holds which block or why (`manager.py`, asked by the
scheduler); the model does not know it is paged.

Layout of one layer's cache, (num_blocks * block_size, n_kv_heads, head_dim):

    slot = block_id * block_size + offset
    block 0: [s0 s1 .. s15] block 1: [s16 .. s31] ...

Attention per step:
  * prefill chunks (T > 1 tokens of one sequence): gather that sequence's blocks, causal SDPA
    with the chunk's position offset (first chunks attend to their own k/v directly);
  * decodes (1 token each): sequences of similar length are grouped, their blocks gathered into
    one padded (B, n_kv, L, head_dim) tensor and attended in one SDPA call with a length mask;
    the query heads of a KV group ride in SDPA's "query length" axis, so GQA needs no repeat.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memlm.kernels import attention as paged_attention
from memlm.models.kv import causal_attention


class KVStore:
    """K/V tensors for `num_blocks` blocks across all attention layers, allocated once.

    dtype fp32 / fp16 / bf16 store K and V as is. dtype int8 stores each token's K (and V) row
    of each KV head as int8 with one fp32 scale (symmetric, scale = max|x| / 127, the layout of
    llama.cpp's q8_0 with a 64-wide block): 68 bytes per head row instead of 128 at fp16,
    which halves both the pool and the bytes decode attention reads.
    """

    def __init__(self, attention_depths: tuple[int, ...], num_blocks: int, block_size: int,
                 n_kv_heads: int, head_dim: int, dtype=torch.float32, device="cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.layer_of_depth = {d: i for i, d in enumerate(attention_depths)}
        n_layers = max(1, len(attention_depths))
        # zeros, not empty: every page is touched now (RSS shows the whole pool at start-up) and
        # never-written slots read as finite values under the padding mask.
        self.kv = torch.zeros(n_layers, 2, num_blocks * block_size, n_kv_heads, head_dim,
                              dtype=dtype, device=device)  # (layers, 2, slots, nkv, hd)
        self.scales = (torch.zeros(n_layers, 2, num_blocks * block_size, n_kv_heads, device=device)
                       if dtype == torch.int8 else None)   # (layers, 2, slots, nkv) fp32
        # Decode attention reads the cache in place with the native kernel where it can.
        self.native_decode = (self.kv.device.type == "cpu"
                              and dtype in (torch.float32, torch.float16, torch.int8)
                              and paged_attention.available())

    @staticmethod
    def bytes_per_block(n_attention_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                        dtype=torch.float32) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        row = head_dim * elem + (4 if dtype == torch.int8 else 0)     # int8 rows carry a scale
        return n_attention_layers * 2 * block_size * n_kv_heads * row

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.kv.numel() * self.kv.element_size() + scales

    def layer(self, depth: int) -> tuple:
        """(k cache, v cache, k scales, v scales) of one layer; scales None unless int8.
        Caches are (slots, nkv, hd), scales (slots, nkv)."""
        li = self.layer_of_depth[depth]
        if self.scales is None:
            return self.kv[li, 0], self.kv[li, 1], None, None
        return self.kv[li, 0], self.kv[li, 1], self.scales[li, 0], self.scales[li, 1]

    def write(self, depth: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' k, v (N, nkv, hd) at `slots` (N,), quantizing for int8."""
        kc, vc, ks, vs = self.layer(depth)
        for x, cache, scales in ((k, kc, ks), (v, vc, vs)):
            if scales is None:
                cache.index_copy_(0, slots, x.to(cache.dtype))
                continue
            x = x.float()
            scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0          # (N, nkv)
            cache.index_copy_(0, slots, torch.round(x / scale[..., None]).to(torch.int8))
            scales.index_copy_(0, slots, scale)

    def gather(self, cache: torch.Tensor, block_tables: torch.Tensor, dtype=torch.float32,
               scales: torch.Tensor | None = None) -> torch.Tensor:
        """(slots, nkv, hd) cache, (B, nb) block ids -> (B, nkv, nb * block_size, hd) in `dtype`."""
        B, nb = block_tables.shape
        blocks = cache.view(self.num_blocks, self.block_size, self.n_kv_heads, self.head_dim)
        g = blocks[block_tables].view(B, nb * self.block_size, self.n_kv_heads, self.head_dim)
        if scales is not None:
            sc = scales.view(self.num_blocks, self.block_size, self.n_kv_heads)[block_tables]
            g = g.float() * sc.view(B, nb * self.block_size, self.n_kv_heads, 1)
        return g.transpose(1, 2).to(dtype)


@dataclass
class PrefillSegment:
    """Rows [start, end) of the step are one sequence's chunk at positions q_offset.."""

    start: int
    end: int
    q_offset: int
    block_table: torch.Tensor     # (nb,) blocks covering positions 0 .. q_offset + T - 1
    seq_id: int


@dataclass
class DecodeGroup:
    """Rows [start, end) are single decode tokens of sequences with similar context lengths."""

    start: int
    end: int
    block_tables: torch.Tensor    # (B, nb) padded with block 0
    lens: torch.Tensor            # (B,) context length of each sequence (incl. this token)
    mask: torch.Tensor | None     # (B, 1, 1, nb * block_size) True where a key is visible
    seq_ids: list[int] = field(default_factory=list)


@dataclass
class PagedBatch:
    """Everything attention needs about one step's flattened tokens."""

    slot_mapping: torch.Tensor                     # (N,) cache slot each new token's k/v goes to
    prefills: list[PrefillSegment]
    decodes: list[DecodeGroup]


class PagedView:
    """`KVView` over a `KVStore` for one step (see the module docstring)."""

    def __init__(self, store: KVStore, batch: PagedBatch, recurrent_states: dict | None = None):
        self.store, self.batch = store, batch
        self.states = recurrent_states if recurrent_states is not None else {}

    def attend(self, depth, q, k, v):
        """q (N, nh, hd); k, v (N, nkv, hd) -> (N, nh, hd) in v's dtype.

        Decode attention always runs in fp32. Prefill attention runs in the inputs' dtype: fp32
        for an fp32 model, bf16 for a bf16-matmul model (`models/linear/bf16.py`), whose q/k/v were
        rounded to bf16 by their projection already; SDPA accumulates in fp32 either way.
        """
        dt = torch.bfloat16 if v.dtype == torch.bfloat16 else torch.float32
        store = self.store
        store.write(depth, self.batch.slot_mapping, k, v)
        kc, vc, ks, vs = store.layer(depth)
        out = torch.empty(q.shape, dtype=dt, device=q.device)
        nh, hd = q.shape[1], q.shape[2]
        nkv = k.shape[1]
        for g in self.batch.decodes:
            B = g.end - g.start
            qg = q[g.start:g.end].float()
            if store.native_decode:
                out[g.start:g.end] = paged_attention.decode_attention(
                    qg.contiguous(), kc, vc, g.block_tables, g.lens, store.block_size, ks, vs)
                continue
            qg = qg.view(B, nkv, nh // nkv, hd)                                # (B, nkv, group, hd)
            keys = store.gather(kc, g.block_tables, scales=ks)                 # (B, nkv, L, hd)
            vals = store.gather(vc, g.block_tables, scales=vs)
            o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=g.mask)  # (B, nkv, group, hd)
            out[g.start:g.end] = o.reshape(B, nh, hd)
        for p in self.batch.prefills:
            T = p.end - p.start
            qp = q[p.start:p.end].transpose(0, 1)[None].to(dt)                 # (1, nh, T, hd)
            if p.q_offset == 0:
                keys = k[p.start:p.end].transpose(0, 1)[None].to(dt)          # (1, nkv, T, hd)
                vals = v[p.start:p.end].transpose(0, 1)[None].to(dt)
            else:   # whole blocks: the tail past the chunk is masked (and keeps SDPA aligned)
                keys = store.gather(kc, p.block_table[None], dt, ks)   # (1, nkv, nb * bs, hd)
                vals = store.gather(vc, p.block_table[None], dt, vs)
            out[p.start:p.end] = causal_attention(qp, keys, vals, p.q_offset)[0].transpose(0, 1)
        return out

    def recurrent(self, depth, x, cell):
        """x (N, C) -> (N, C), carrying each sequence's state in `recurrent_states`."""
        out = torch.empty_like(x)
        segments = [(p.start, p.end, p.seq_id) for p in self.batch.prefills]
        for g in self.batch.decodes:
            segments += [(g.start + i, g.start + i + 1, sid) for i, sid in enumerate(g.seq_ids)]
        for start, end, sid in segments:
            y, self.states[(sid, depth)] = cell.scan(x[start:end][None], self.states.get((sid, depth)))
            out[start:end] = y[0]
        return out
