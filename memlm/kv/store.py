"""The tensors behind KV block ids.

Owns: `KVStore` (the pool of every attention layer, allocated once in one KV codec
(`codecs.py`; int4 / int2 with the fp16 window of `window.py`), indexed by
block id * block_size + offset = slot): writing, gathering, decode attention in place, block
export / import, and copying slots (an evicting KV policy packing its kept tokens).
Does not know: which sequence holds which block or why (`manager.py`, asked by the
scheduler), or a step's layout (`paged_view.py`); the model does not know it is paged.

Layout of one layer's cache, (num_blocks * block_size, n_kv_heads, head_dim):

    slot = block_id * block_size + offset
    block 0: [s0 s1 .. s15] block 1: [s16 .. s31] ...
"""
from __future__ import annotations

import torch

from memlm import dtypes
from memlm.kernels import attention as paged_attention
from memlm.kernels import attention_kivi
from memlm.kv import codecs
from memlm.kv.window import KVWindow

DEFAULT_WINDOW_STAGES = 8      # window stages of a store built without the engine's count


class KVStore:
    """K/V of `num_blocks` blocks across all attention layers, allocated once, in one codec.

    The codec (`codecs.py`) owns the layout: fp32 / fp16 / bf16 rows as is, int8 rows with a
    scale per token and head, int4 / int2 KIVI blocks. A block codec also gets a `KVWindow`
    (`window.py`): each sequence's partial last block stays in fp16 until it fills, then the
    whole block is encoded at once. Decode attention reads the codes in place (native kernels:
    `kernels/attention.py`, `kernels/attention_kivi.py`); prefill chunks and the torch path
    gather and decode.
    """

    def __init__(self, attention_depths: tuple[int, ...], num_blocks: int, block_size: int,
                 n_kv_heads: int, head_dim: int, dtype="fp32", device="cpu",
                 window_stages: int | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.dtype = dtypes.parse(dtype, dtypes.NAMES, "kv_dtype")
        self.layer_of_depth = {d: i for i, d in enumerate(attention_depths)}
        n_layers = max(1, len(attention_depths))
        # zeros, not empty: every page is touched now (RSS shows the whole pool at start-up) and
        # never-written slots read as finite values under the padding mask.
        self.codec = codecs.make_codec(self.dtype, n_layers, num_blocks, block_size, n_kv_heads,
                                       head_dim, device)
        self.window = None
        if self.codec.block_granular:
            stages = window_stages if window_stages is not None else min(num_blocks, DEFAULT_WINDOW_STAGES)
            self.window = KVWindow(n_layers, num_blocks, max(1, stages), block_size, n_kv_heads,
                                   head_dim, device)
        self._plan_slots, self._plan = None, None
        self._addresses: dict[int, tuple[int, int]] | None = None
        # Decode attention reads the cache in place with a native kernel where it can.
        kernel = attention_kivi if self.codec.block_granular else paged_attention
        self.native_decode = (torch.device(device).type == "cpu" and self.dtype != "bf16"
                              and kernel.available())

    @staticmethod
    def bytes_per_block(n_attention_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                        dtype="fp32") -> int:
        """Exact bytes one block takes in the pool, scales included (the window is apart)."""
        name = dtypes.parse(dtype, dtypes.NAMES, "kv_dtype")
        per_token = codecs.bytes_per_token(name, block_size, n_kv_heads, head_dim)
        stage_map = 4 if name in codecs.KIVI_VALUE_GROUP else 0     # the window's int32 per block
        return int(round(n_attention_layers * block_size * per_token)) + stage_map

    @staticmethod
    def window_bytes(n_attention_layers: int, stages: int, block_size: int, n_kv_heads: int,
                     head_dim: int, dtype="fp32") -> int:
        """Bytes of the fp16 stages a block codec keeps beside the pool (0 for token codecs)."""
        if dtypes.parse(dtype, dtypes.NAMES, "kv_dtype") not in codecs.KIVI_VALUE_GROUP:
            return 0
        return n_attention_layers * 2 * stages * block_size * n_kv_heads * head_dim * 2

    @property
    def nbytes(self) -> int:
        """Every byte the store holds: the codec's pool, and a block codec's window + stage map."""
        if self.window is None:
            return self.codec.nbytes
        return self.codec.nbytes + self.window.nbytes + self.window.stage_of_block.numel() * 4

    # ---- block export / import (the warm and cold tiers: kv/offload.py) ---------------------
    def block_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the store that holds per-slot data, by name, whatever the codec's
        layout: each is (layers, 1 or 2, slots, ...) with the slot on axis 2."""
        return self.codec.block_tensors()

    def _slots_of(self, block_ids: list[int]) -> torch.Tensor:
        ids = torch.as_tensor(block_ids, dtype=torch.long)
        slots = ids[:, None] * self.block_size + torch.arange(self.block_size)   # (nb, bs)
        return slots.reshape(-1).to(self.codec.device)

    def export_blocks(self, block_ids: list[int]) -> dict[str, torch.Tensor]:
        """Copies of the blocks' contents, bytes as stored: name -> (layers, 2, nb * bs, ...) on CPU.
        Partial blocks in the window are encoded first (they reopen when written again)."""
        if self.window is not None:
            stages, blocks, fills = (torch.tensor(x, dtype=torch.long) for x in self.window.flush_all(block_ids))
            for li in range(self.codec.n_layers):
                self._encode_stages(li, stages, blocks, fills)
        slots = self._slots_of(block_ids)
        return {name: t.index_select(2, slots).cpu() for name, t in self.block_tensors().items()}

    def import_blocks(self, block_ids: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Write what `export_blocks` returned (of the same layout) into `block_ids`."""
        own = self.block_tensors()
        n = len(block_ids) * self.block_size
        for name, t in own.items():
            src = tensors.get(name)
            want = (*t.shape[:2], n, *t.shape[3:])
            if src is None or tuple(src.shape) != want or src.dtype != t.dtype:
                raise ValueError(f"KV blocks to import do not match the store's {name!r} layout "
                                 f"{want} {t.dtype}")
        if self.window is not None:
            self.window.flush_all(block_ids)     # stale stages of these ids: the codes win
        slots = self._slots_of(block_ids)
        for name, t in own.items():
            t.index_copy_(2, slots, tensors[name].to(t.device))

    def block_rows(self, block_ids: list[int], flush: bool = True) -> "BlockRows":
        """Chunked access to the contents of `block_ids` (a tier's `ChunkSource` and sink for
        `entry.encode_stream` / `entry.decode_into`), without a copy of them all. `flush`:
        partial blocks in the window are encoded first (export) or dropped (import: the codes win)."""
        if self.window is not None:
            stages, blocks, fills = (torch.tensor(x, dtype=torch.long) for x in self.window.flush_all(block_ids))
            if flush:
                for li in range(self.codec.n_layers):
                    self._encode_stages(li, stages, blocks, fills)
        return BlockRows(self.block_tensors(), self._slots_of(block_ids) if block_ids else
                         torch.zeros(0, dtype=torch.long, device=self.codec.device))

    # ---- writing and reading --------------------------------------------------------------
    def layer(self, depth: int) -> tuple:
        """(k cache, v cache, k scales, v scales) of one layer of a token codec; scales None
        unless int8. Caches are (slots, nkv, hd), scales (slots, nkv)."""
        li, c = self.layer_of_depth[depth], self.codec
        scales = getattr(c, "scales", None)
        if scales is None:
            return c.kv[li, 0], c.kv[li, 1], None, None
        return c.kv[li, 0], c.kv[li, 1], scales[li, 0], scales[li, 1]

    def layer_addresses(self) -> dict[int, tuple[int, int]]:
        """depth -> the addresses of `layer(depth)`'s k and v caches (a token codec's), worked out
        once: a native caller reads them per layer and step without indexing tensors."""
        if self._addresses is None:
            self._addresses = {d: tuple(t.data_ptr() for t in self.layer(d)[:2]) for d in self.layer_of_depth}
        return self._addresses

    def write(self, depth: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' k, v (N, nkv, hd) at `slots` (N,); the same `slots` tensor for every
        layer of a step (a block codec plans its window once per step)."""
        li = self.layer_of_depth[depth]
        if self.window is None:
            self.codec.encode(li, slots, k, v)
            return
        if slots is not self._plan_slots:
            self._plan_slots, self._plan = slots, self.window.plan(slots)
        p, win = self._plan, self.window
        self._encode_stages(li, *p.flush)
        if p.reopen[0].numel():
            kd, vd = self.codec.decode(li, p.reopen[0])                      # (n, bs, nkv, hd)
            staged = win.kv[li].view(2, win.num_stages, self.block_size, self.n_kv_heads, self.head_dim)
            staged[:, p.reopen[1]] = torch.stack([kd, vd]).to(torch.float16)
        if p.stage_rows.numel():
            win.kv[li, 0].index_copy_(0, p.stage_slots, k[p.stage_rows].to(torch.float16))
            win.kv[li, 1].index_copy_(0, p.stage_slots, v[p.stage_rows].to(torch.float16))
        stages, blocks = p.complete
        self._encode_stages(li, stages, blocks, torch.full_like(stages, self.block_size))
        if p.direct_blocks.numel():
            shape = (-1, self.block_size, self.n_kv_heads, self.head_dim)
            self.codec.encode_blocks(li, p.direct_blocks, k[p.direct_rows].view(shape),
                                     v[p.direct_rows].view(shape))

    def _encode_stages(self, li: int, stages: torch.Tensor, blocks: torch.Tensor, fills: torch.Tensor) -> None:
        if stages.numel():
            ks, vs = self.window.padded(li, stages, fills)
            self.codec.encode_blocks(li, blocks, ks, vs)

    def gather_kv(self, depth: int, block_tables: torch.Tensor, dtype=torch.float32):
        """(B, nb) block ids -> keys, values (B, nkv, nb * block_size, hd) in `dtype`, decoded
        (partial blocks of a block codec from the window)."""
        B, nb = block_tables.shape
        li, ids = self.layer_of_depth[depth], block_tables.reshape(-1)
        k, v = self.codec.decode(li, ids)                                    # (B * nb, bs, nkv, hd)
        if self.window is not None:
            st = self.window.stage_of_block[ids].long()
            staged = st >= 0
            if bool(staged.any()):
                win = self.window.kv[li].view(2, -1, self.block_size, self.n_kv_heads, self.head_dim)
                k[staged], v[staged] = win[0, st[staged]].float(), win[1, st[staged]].float()
        shape = (B, nb * self.block_size, self.n_kv_heads, self.head_dim)
        return k.view(shape).transpose(1, 2).to(dtype), v.view(shape).transpose(1, 2).to(dtype)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the contents of slots `src` (n,) into slots `dst` (n,), every layer (disjoint sets).

        An evicting KV policy packs a sequence's kept tokens this way (`kv/policies.py`); a
        block codec encodes whole blocks, so it cannot move single tokens and refuses."""
        if self.window is not None:
            raise ValueError(f"kv_dtype {self.dtype} stores whole blocks and cannot evict single tokens; "
                             "use kv_dtype fp16, fp32 or int8 with an evicting kv_policy")
        for t in self.block_tensors().values():
            t.index_copy_(2, dst, t.index_select(2, src))

    def decode_attention(self, depth: int, q: torch.Tensor, block_tables: torch.Tensor,
                         lens: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, nh, hd) fp32 contiguous -> (B, nh, hd) fp32 through the native kernel; `mass`
        ((B, nkv, nb * block_size) fp32) accumulates each key's attention weight (H2O)."""
        if self.window is None:
            kc, vc, ks, vs = self.layer(depth)
            return paged_attention.decode_attention(q, kc, vc, block_tables, lens, self.block_size,
                                                    ks, vs, mass)
        li, c, win = self.layer_of_depth[depth], self.codec, self.window
        return attention_kivi.decode_attention(
            q, c.codes[li, 0], c.codes[li, 1], c.key_params(li), c.v_params[li, 0],
            win.kv[li, 0], win.kv[li, 1], win.stage_of_block, block_tables, lens,
            self.block_size, c.bits, c.group, mass)


class BlockRows:
    """Rows x slots chunks of a store's block tensors at some blocks' slots: each tensor
    (A, B, pool slots, ...) is seen as A * B rows of `len(slots)` slots."""

    def __init__(self, tensors: dict[str, torch.Tensor], slots: torch.Tensor):
        self.tensors, self.slots = tensors, slots
        n = int(slots.numel())
        # blocks in ascending order, one after the other: plain slices instead of index copies
        self.start = int(slots[0]) if n and torch.equal(
            slots.cpu(), torch.arange(int(slots[0]), int(slots[0]) + n)) else None

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        n = int(self.slots.numel())
        return [(name, t.dtype, (t.shape[0], t.shape[1], n, *t.shape[3:])) for name, t in self.tensors.items()]

    def read(self, name: str, r0: int, r1: int, s0: int, s1: int) -> torch.Tensor:
        """A new CPU tensor (r1 - r0, s1 - s0, ...) of rows r0..r1 at slots s0..s1."""
        t, idx = self.tensors[name], self.slots[s0:s1]
        out = torch.empty((r1 - r0, s1 - s0, *t.shape[3:]), dtype=t.dtype, device=t.device)
        for i, r in enumerate(range(r0, r1)):
            row = t[r // t.shape[1], r % t.shape[1]]
            if self.start is not None:
                out[i].copy_(row[self.start + s0:self.start + s1])
            else:
                torch.index_select(row, 0, idx, out=out[i])
        return out.cpu()

    def check(self, specs) -> None:
        """Refuse chunks of another layout (ValueError) before anything is written; `specs` may
        hold more slots than these blocks (the rest is skipped)."""
        own = {name: (d, shape) for name, d, shape in self.specs()}
        for name, dtype, shape in specs:
            d, want = own.pop(name, (None, None))
            if d != dtype or want is None or tuple(shape[:2]) + tuple(shape[3:]) != want[:2] + want[3:] \
                    or shape[2] < want[2]:
                raise ValueError(f"KV blocks to import do not match the store's {name!r} layout {want} {d}")
        if own:
            raise ValueError(f"KV blocks to import lack the store's tensors {sorted(own)}")

    def write(self, name: str, r0: int, r1: int, s0: int, s1: int, src: torch.Tensor) -> None:
        """Write `src` (r1 - r0, s1 - s0, ...) into rows r0..r1 at slots s0..s1 (slots past
        these blocks are skipped)."""
        s1 = min(s1, int(self.slots.numel()))
        if s1 <= s0:
            return
        t, idx = self.tensors[name], self.slots[s0:s1]
        src = src.to(t.device)
        for i, r in enumerate(range(r0, r1)):
            row = t[r // t.shape[1], r % t.shape[1]]
            if self.start is not None:
                row[self.start + s0:self.start + s1].copy_(src[i, :s1 - s0])
            else:
                row.index_copy_(0, idx, src[i, :s1 - s0])
