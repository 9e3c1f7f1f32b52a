"""KVCacheManager with exact block ids; torch-free (sequences are two-field stand-ins)."""
import subprocess
import sys
from dataclasses import dataclass

import pytest

from memlm.kv.manager import KVCacheManager


@dataclass
class Seq:
    seq_id: int
    num_computed_tokens: int = 0


def grow(kv, seq, n):
    """Allocate n more tokens and mark them computed, as a step of the engine would."""
    assert kv.allocate_slots(seq, n)
    seq.num_computed_tokens += n


def test_allocate_across_block_boundaries():
    kv = KVCacheManager(8, 4)
    a, b = Seq(0), Seq(1)
    assert kv.num_blocks_needed(a, 3) == 1
    grow(kv, a, 3)
    assert kv.block_table(a) == [0]
    assert kv.num_blocks_needed(a, 1) == 0          # position 3 still fits block 0
    grow(kv, a, 1)
    assert kv.block_table(a) == [0]
    assert kv.num_blocks_needed(a, 5) == 2          # positions 4 .. 8: blocks 1 and 2
    grow(kv, b, 6)
    assert kv.block_table(b) == [1, 2]
    grow(kv, a, 5)
    assert kv.block_table(a) == [0, 3, 4]
    assert kv.block_table(Seq(9)) == []
    table = kv.block_table(a)
    table.append(99)                                # a copy: the manager's table is unchanged
    assert kv.block_table(a) == [0, 3, 4]
    assert (kv.num_used_blocks, kv.num_free_blocks) == (5, 3)


def test_refuses_when_full_and_takes_nothing():
    kv = KVCacheManager(4, 4)
    a, b = Seq(0), Seq(1)
    grow(kv, a, 12)                                 # blocks 0, 1, 2
    assert not kv.allocate_slots(b, 8)              # needs 2, one is free
    assert kv.block_table(b) == [] and kv.num_free_blocks == 1
    grow(kv, b, 4)                                  # block 3
    assert not kv.allocate_slots(a, 1)
    assert kv.block_table(a) == [0, 1, 2] and kv.num_free_blocks == 0
    kv.free(b)                                      # what a preemption does
    assert kv.allocate_slots(a, 1) and kv.block_table(a) == [0, 1, 2, 3]


def test_fork_shares_full_blocks_by_ref_count_and_frees_on_the_last_reference():
    kv = KVCacheManager(8, 4)
    parent, c1, c2, c3 = Seq(0), Seq(1), Seq(2), Seq(3)
    grow(kv, parent, 10)                            # blocks 0, 1, 2 (block 2 half full)
    assert kv.fork(parent, c1, 9) == 8              # t0 .. t7: the full blocks 0 and 1
    assert kv.fork(parent, c2, 9) == 8
    assert kv.fork(parent, c3, 3) == 0              # no full block: c3 shares nothing
    assert kv.block_table(c1) == [0, 1] and kv.block_table(c2) == [0, 1] and kv.block_table(c3) == []
    assert kv.pool.ref_counts[:4] == [3, 3, 1, 0] and kv.num_used_blocks == 3
    with pytest.raises(RuntimeError):
        kv.fork(parent, c1, 9)                      # c1 already holds blocks
    kv.free(parent)                                 # block 2 was the parent's alone
    assert kv.pool.ref_counts[:3] == [2, 2, 0] and kv.num_free_blocks == 6
    c1.num_computed_tokens = 8
    grow(kv, c1, 2)                                 # c1's own tail block: 3 (2 went back last)
    assert kv.block_table(c1) == [0, 1, 3]
    kv.free(c1)
    assert kv.pool.ref_counts[:4] == [1, 1, 0, 0]
    kv.free(c2)                                     # the last reference to blocks 0 and 1
    assert kv.num_free_blocks == 8 and all(c == 0 for c in kv.pool.ref_counts)


def test_usage_and_fragmentation_count_shared_blocks_once():
    kv = KVCacheManager(8, 4)
    assert kv.usage == 0.0 and kv.fragmentation([]) == 0.0
    parent, child = Seq(0), Seq(1)
    grow(kv, parent, 6)                             # blocks 0, 1: 6 of 8 slots used
    assert kv.usage == 2 / 8 and kv.fragmentation([parent]) == pytest.approx(2 / 8)
    grow(kv, parent, 4)                             # 10 tokens: blocks 0, 1, 2
    child.num_computed_tokens = kv.fork(parent, child, 9)
    grow(kv, child, 2)                              # child: [0, 1, 3], 10 tokens
    assert kv.num_used_blocks == 4 and kv.usage == 4 / 8
    # 16 slots allocated; used: 4 + 4 (shared, once) + 2 (block 2) + 2 (block 3)
    assert kv.fragmentation([parent, child]) == pytest.approx(4 / 16)
    assert kv.fragmentation([parent]) == pytest.approx(6 / 16)   # block 3 counted as unused
    assert (kv.num_blocks, kv.block_size, kv.capacity_tokens) == (8, 4, 32)
    assert [kv.blocks_for(n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_free_returns_every_block():
    kv = KVCacheManager(6, 2)
    seqs = [Seq(i) for i in range(3)]
    for s, n in zip(seqs, (3, 4, 5)):               # 2 + 2 + 3 blocks > 6: the last one fails
        if kv.allocate_slots(s, n):
            s.num_computed_tokens = n
    assert kv.block_table(seqs[2]) == [] and kv.num_free_blocks == 2
    kv.fork(seqs[1], seqs[2], 4)                    # seqs[2] shares both blocks of seqs[1]
    for s in seqs:
        kv.free(s)
    kv.free(seqs[0])                                # holds nothing now: a no-op
    assert kv.num_free_blocks == 6 and kv.pool.ref_counts == [0] * 6
    assert kv.pool.allocate(6) == [4, 5, 1, 0, 3, 2]   # freed tail first, each sequence in turn


def test_manager_imports_no_torch():
    code = "import sys, memlm.kv.manager; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
