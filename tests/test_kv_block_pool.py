import sys

import pytest

from memlm.kv.block_pool import BlockPool


def test_allocate_exact_ids_and_all_or_nothing():
    pool = BlockPool(6, 4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.allocate(2) is None          # only block 5 is free: nothing taken
    assert pool.num_free_blocks == 1 and pool.num_used_blocks == 5
    assert pool.allocate(1) == [5]


def test_free_order_reuses_tail_blocks_first():
    pool = BlockPool(6, 4)
    a = pool.allocate(3)                     # [0, 1, 2]
    pool.allocate(1)                         # [3]
    pool.free(a)                             # released 2, 1, 0 (tail first)
    assert pool.allocate(4) == [4, 5, 2, 1]
    assert pool.allocate(1) == [0]


def test_ref_counts_and_sharing():
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    pool.share(a[:1])
    assert pool.ref_counts == [2, 1, 0, 0]
    pool.free(a)                             # block 0 still referenced by the fork
    assert pool.ref_counts == [1, 0, 0, 0] and pool.num_free_blocks == 3
    pool.free([0])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        pool.free([0])
    with pytest.raises(RuntimeError):
        pool.share([1])


def test_blocks_for_and_capacity():
    pool = BlockPool(3, 16)
    assert [pool.blocks_for(n) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    assert pool.capacity_tokens == 48
    with pytest.raises(ValueError):
        BlockPool(0, 16)


def test_block_pool_imports_no_torch():
    import subprocess
    code = "import sys, memlm.kv.block_pool; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
