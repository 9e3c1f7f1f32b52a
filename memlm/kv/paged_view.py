"""The paged `KVView` the model attends through, and the per-step layout it reads.

Owns: `PagedBatch` (one step's flattened tokens: the slot each new token's k/v goes to,
prefill segments, decode groups, sink rows to copy), `PrefillSegment`, `DecodeGroup` and
`PagedView` (the `KVView` protocol over a `KVStore`), including the attention mass an H2O /
SnapKV policy reads (`kv/policies.py`): decode groups get it from the decode kernel as it
computes, prefill segments from their last `observe` queries.
Does not know: which sequence holds which block or why (`manager.py`), which tokens a policy
keeps, or how the tensors are encoded (`store.py` and its codecs); the model does not know it
is paged.

Attention per step:
  * prefill chunks (T > 1 tokens of one sequence): gather that sequence's blocks, causal SDPA
    with the chunk's cache offset (first chunks attend to their own k/v directly);
  * decodes (1 token each): the native kernel reads the blocks in place; the torch path groups
    sequences of similar length, gathers their blocks into one padded (B, n_kv, L, head_dim)
    tensor and attends in one SDPA call with a length mask (the query heads of a KV group ride
    in SDPA's "query length" axis, so GQA needs no repeat).
Offsets and lengths count cache entries, not text positions: under an evicting policy entry i
holds whatever token the policy packed there (RoPE positions came with the keys).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memlm.kernels import attention as paged_attention
from memlm.kv.store import KVStore
from memlm.models.kv import causal_attention


@dataclass
class PrefillSegment:
    """Rows [start, end) of the step are one sequence's chunk at cache entries q_offset.."""

    start: int
    end: int
    q_offset: int
    block_table: torch.Tensor     # (nb,) blocks covering entries 0 .. q_offset + T - 1
    seq_id: int
    observe: int = 0              # last queries whose attention is added to `mass`
    mass: torch.Tensor | None = None   # (nkv, nb * block_size) fp32, accumulated over layers


@dataclass
class DecodeGroup:
    """Rows [start, end) are single decode tokens of sequences with similar cache lengths."""

    start: int
    end: int
    block_tables: torch.Tensor    # (B, nb) padded with block 0
    lens: torch.Tensor            # (B,) cache entries of each sequence (incl. this token)
    mask: torch.Tensor | None     # (B, 1, 1, nb * block_size) True where a key is visible
    seq_ids: list[int] = field(default_factory=list)
    mass: torch.Tensor | None = None   # (B, nkv, nb * block_size) fp32, accumulated over layers


@dataclass
class PagedBatch:
    """Everything attention needs about one step's flattened tokens."""

    slot_mapping: torch.Tensor                     # (N,) cache slot each new token's k/v goes to
    prefills: list[PrefillSegment]
    decodes: list[DecodeGroup]
    # (row, copy, i): keep row's k, v of every layer in copy[layer, 0 / 1, i] (fp32 sink keys
    # that the runner re-rotates when a sinks policy slides its window)
    sink_rows: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)


class PagedView:
    """`KVView` over a `KVStore` for one step (see the module docstring)."""

    def __init__(self, store: KVStore, batch: PagedBatch, recurrent_states: dict | None = None):
        self.store, self.batch = store, batch
        self.states = recurrent_states if recurrent_states is not None else {}
        self._direct: tuple | None | bool = False      # False: not planned yet

    def direct_decode(self, depth: int) -> tuple | None:
        """For native layer steps (`kernels.block_layer.decode_layers`), which write this step's
        k / v rows themselves and attend through the native kernel: (k cache, v cache (addresses),
        fp16?, slots, block tables, lens (addresses), max blocks, block size, kernel address) of
        layer `depth`, when every row is a decode token of one group on an fp32 / fp16 cache the
        kernel reads in place and nothing else watches the step (no window, sink rows or
        attention mass); None otherwise (then `attend`)."""
        if self._direct is False:
            self._direct = self._plan_direct()
        if self._direct is None:
            return None
        return self.store.layer_addresses()[depth] + self._direct

    def _plan_direct(self) -> tuple | None:
        b, store = self.batch, self.store
        if b.prefills or len(b.decodes) != 1 or b.sink_rows or store.window is not None:
            return None
        g = b.decodes[0]
        kc = store.layer(next(iter(store.layer_of_depth)))[0] if store.layer_of_depth else None
        if (g.mass is not None or not store.native_decode or kc is None or kc.device.type != "cpu"
                or kc.dtype not in (torch.float16, torch.float32) or g.start != 0
                or g.end != b.slot_mapping.shape[0]):
            return None
        fn = paged_attention.kernel_address(kc.dtype, store.head_dim, store.block_size)
        tables, lens = g.block_tables.contiguous(), g.lens.contiguous()
        slots = b.slot_mapping.to(torch.int64).contiguous()
        if fn is None or tables.dtype != torch.int64 or lens.dtype != torch.int64:
            return None
        self._held = (tables, lens, slots)
        return (int(kc.dtype == torch.float16), slots.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                tables.shape[1], store.block_size, fn)

    def attend(self, depth, q, k, v):
        """q (N, nh, hd); k, v (N, nkv, hd) -> (N, nh, hd) in v's dtype.

        Decode attention always runs in fp32. Prefill attention runs in the inputs' dtype: fp32
        for an fp32 model, bf16 for a bf16-matmul model (`models/linear/bf16.py`), whose q/k/v were
        rounded to bf16 by their projection already; SDPA accumulates in fp32 either way.
        """
        dt = torch.bfloat16 if v.dtype == torch.bfloat16 else torch.float32
        store = self.store
        store.write(depth, self.batch.slot_mapping, k, v)
        if self.batch.sink_rows:
            li = store.layer_of_depth[depth]
            for row, copy, i in self.batch.sink_rows:
                copy[li, 0, i], copy[li, 1, i] = k[row].float(), v[row].float()
        out = torch.empty(q.shape, dtype=dt, device=q.device)
        nh, hd = q.shape[1], q.shape[2]
        nkv = k.shape[1]
        for g in self.batch.decodes:
            B = g.end - g.start
            qg = q[g.start:g.end].float()
            if store.native_decode:
                out[g.start:g.end] = store.decode_attention(depth, qg.contiguous(), g.block_tables,
                                                            g.lens, g.mass)
                continue
            qg = qg.view(B, nkv, nh // nkv, hd)                                # (B, nkv, group, hd)
            keys, vals = store.gather_kv(depth, g.block_tables)                # (B, nkv, L, hd)
            if g.mass is None:
                o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=g.mask)  # (B, nkv, group, hd)
            else:
                p = _weights(qg, keys, g.mask)                                 # (B, nkv, group, L)
                o = p @ vals
                g.mass += p.sum(2)
            out[g.start:g.end] = o.reshape(B, nh, hd)
        for p in self.batch.prefills:
            qp = q[p.start:p.end].transpose(0, 1)[None].to(dt)                 # (1, nh, T, hd)
            if p.q_offset == 0:
                keys = k[p.start:p.end].transpose(0, 1)[None].to(dt)          # (1, nkv, T, hd)
                vals = v[p.start:p.end].transpose(0, 1)[None].to(dt)
            else:   # whole blocks: the tail past the chunk is masked (and keeps SDPA aligned)
                keys, vals = store.gather_kv(depth, p.block_table[None], dt)  # (1, nkv, nb * bs, hd)
            out[p.start:p.end] = causal_attention(qp, keys, vals, p.q_offset)[0].transpose(0, 1)
            if p.mass is not None and p.observe:
                self._observe(p, qp, keys)
        return out

    @staticmethod
    def _observe(p: PrefillSegment, qp: torch.Tensor, keys: torch.Tensor) -> None:
        """Add the attention of the segment's last `observe` queries to its mass (SnapKV's
        observation window; H2O's prompt scores)."""
        T, nkv = p.end - p.start, keys.shape[1]
        n = min(p.observe, T)
        qo = qp[0, :, T - n:].float()                                        # (nh, n, hd)
        qo = qo.view(nkv, -1, n, qo.shape[-1]).flatten(1, 2)                 # (nkv, group * n, hd)
        qpos = torch.arange(p.q_offset + T - n, p.q_offset + T, device=qp.device)
        mask = torch.arange(keys.shape[2], device=qp.device)[None, :] <= qpos[:, None]  # (n, L)
        mask = mask.repeat(qo.shape[1] // n, 1)[None, None]                  # (1, 1, group * n, L)
        w = _weights(qo[None], keys.float(), mask)[0]                        # (nkv, group * n, L)
        L = min(w.shape[-1], p.mass.shape[-1])
        p.mass[:, :L] += w.sum(1)[:, :L]

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


def _weights(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention weights: q (B, nkv, G, hd), keys (B, nkv, L, hd) -> (B, nkv, G, L) fp32."""
    s = q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1)
