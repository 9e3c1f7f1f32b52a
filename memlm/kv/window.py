"""The full-precision window of a block codec: partial blocks kept in fp16 until they fill.

Owns: a small fp16 pool of `num_stages` block-sized stages, the map block id -> stage
(`stage_of_block`, read by the decode kernel), and each step's `WritePlan`: which new rows go
to a stage, which stages are full and get encoded (then released), which blocks arrive whole
and are encoded directly.
Does not know: which sequence holds a block (the store is told nothing when blocks are freed),
how blocks are encoded (`codecs.py`).

    block 7 (partial, stage 2):  window stage 2: [t0 .. t9 . . . . . .]   codes of block 7: stale
    t10 .. t15 written         -> stage 2 full: encode into block 7, release stage 2

Stale stages (a block freed while partial) are found by age: when no stage is free, the least
recently written stage not touched this step is flushed (its tokens encoded into its block,
padded with its first row so the per-channel range only covers real tokens). A live block
flushed this way, or imported by a tier as codes, is *reopened* when written again: its codes
are decoded into a stage and the block is re-encoded once it fills. With one stage per running
sequence and a spare, that only happens to blocks nobody holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WritePlan:
    """What one step's slot mapping does to the window, computed once for all layers."""

    flush: tuple[torch.Tensor, torch.Tensor, torch.Tensor]     # stages, blocks, fills: encode + free
    reopen: tuple[torch.Tensor, torch.Tensor]                  # blocks, stages: decode codes into stage
    stage_rows: torch.Tensor                                   # rows of the step's k/v going to stages
    stage_slots: torch.Tensor                                  # their window slots (stage * bs + offset)
    complete: tuple[torch.Tensor, torch.Tensor]                # stages, blocks now full: encode + free
    direct_blocks: torch.Tensor                                # blocks written whole this step
    direct_rows: torch.Tensor                                  # their rows, block-major, offset order


class KVWindow:
    """fp16 stages for the partial blocks of a block codec, `kv` (layers, 2, stages * bs, nkv, hd)."""

    def __init__(self, n_layers: int, num_blocks: int, num_stages: int, block_size: int,
                 n_kv_heads: int, head_dim: int, device="cpu"):
        self.num_stages, self.block_size = num_stages, block_size
        self.kv = torch.zeros(n_layers, 2, num_stages * block_size, n_kv_heads, head_dim,
                              dtype=torch.float16, device=device)
        self.stage_of_block = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
        self._stage_of: dict[int, int] = {}        # block -> stage (mirror of stage_of_block)
        self._block_of = [-1] * num_stages
        self._fill = [0] * num_stages              # tokens written into each stage
        self._last = [0] * num_stages              # step each stage was last written
        self._free = list(range(num_stages - 1, -1, -1))
        self._clock = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the fp16 stages (the stage map is counted per block: `KVStore.bytes_per_block`)."""
        return self.kv.numel() * 2

    def plan(self, slots: torch.Tensor) -> WritePlan:
        """Assign stages for one step's new rows (`slots` (N,), positions in order per block)."""
        bs = self.block_size
        self._clock += 1
        rows_of: dict[int, list[tuple[int, int]]] = {}
        for r, slot in enumerate(slots.tolist()):
            b, o = divmod(slot, bs)
            rows_of.setdefault(b, []).append((o, r))
        flush, reopen, complete, release = [], [], [], []
        stage_rows, stage_slots, direct_blocks, direct_rows = [], [], [], []
        for b, items in rows_of.items():
            items.sort()
            lo, hi = items[0][0], items[-1][0]
            st = self._stage_of.get(b)
            if lo == 0 and len(items) == bs:                  # arrives whole: no stage needed
                if st is not None:
                    release.append(st)                        # stale stage of a reused block
                direct_blocks.append(b)
                direct_rows += [r for _, r in items]
                continue
            if st is None:
                st = self._take(rows_of, flush)
                self._stage_of[b], self._block_of[st] = st, b
                self._fill[st] = 0
                if lo > 0:                                    # its first tokens are codes
                    reopen.append((b, st))
            elif lo == 0:
                self._fill[st] = 0                            # a reused block: old tokens void
            self._fill[st] = max(self._fill[st], hi + 1)
            self._last[st] = self._clock
            stage_rows += [r for _, r in items]
            stage_slots += [st * bs + o for o, _ in items]
            if self._fill[st] == bs:
                complete.append((st, b))
                release.append(st)
        for st in release:                                    # after all takes: no reuse this step
            self._release(st)
        self._sync(rows_of, flush)

        def t(xs):
            return torch.tensor(xs, dtype=torch.long)

        def pair(xs, i):
            return t([x[i] for x in xs])
        return WritePlan(flush=(pair(flush, 0), pair(flush, 1), pair(flush, 2)),
                         reopen=(pair(reopen, 0), pair(reopen, 1)),
                         stage_rows=t(stage_rows), stage_slots=t(stage_slots),
                         complete=(pair(complete, 0), pair(complete, 1)),
                         direct_blocks=t(direct_blocks), direct_rows=t(direct_rows))

    def flush_all(self, blocks: list[int]) -> tuple[list[int], list[int], list[int]]:
        """Release the stages of `blocks` (a tier exports them); returns (stages, blocks, fills)
        for the caller to encode first."""
        out = ([], [], [])
        for b in blocks:
            st = self._stage_of.get(b)
            if st is not None:
                out[0].append(st), out[1].append(b), out[2].append(self._fill[st])
                self._release(st)
                self.stage_of_block[b] = -1
        return out

    def _take(self, touched: dict, flush: list) -> int:
        if self._free:
            return self._free.pop()
        idle = [s for s in range(self.num_stages) if self._block_of[s] >= 0 and self._block_of[s] not in touched]
        if not idle:
            raise RuntimeError(f"KV window full: more than {self.num_stages} partial blocks written in "
                               "one step (the window has one stage per sequence the engine runs)")
        st = min(idle, key=lambda s: self._last[s])
        flush.append((st, self._block_of[st], self._fill[st]))
        del self._stage_of[self._block_of[st]]
        return st

    def _release(self, st: int) -> None:
        b = self._block_of[st]
        if b >= 0 and self._stage_of.get(b) == st:
            del self._stage_of[b]
        self._block_of[st] = -1
        self._free.append(st)

    def _sync(self, touched: dict, flush: list) -> None:
        """Mirror this step's changes into `stage_of_block` (one scatter)."""
        blocks = list(touched) + [f[1] for f in flush]
        if blocks:
            ids = torch.tensor(blocks, dtype=torch.long)
            vals = torch.tensor([self._stage_of.get(b, -1) for b in blocks], dtype=torch.int32)
            self.stage_of_block[ids.to(self.stage_of_block.device)] = vals.to(self.stage_of_block.device)

    def padded(self, li: int, stages: torch.Tensor, fills: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages' k, v (n, bs, nkv, hd) fp32 with rows past each fill replaced by its first row."""
        bs = self.block_size
        kv = self.kv[li].view(2, self.num_stages, bs, *self.kv.shape[3:])[:, stages].float()
        past = (torch.arange(bs)[None, :] >= fills[:, None]).to(kv.device)    # (n, bs)
        kv = torch.where(past[None, :, :, None, None], kv[:, :, :1], kv)
        return kv[0], kv[1]
