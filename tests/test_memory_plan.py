"""The memory plan: budget + measured profile + KV block size -> a frozen plan."""
import dataclasses

import pytest

from memlm.errors import OutOfBudgetError
from memlm.memory.budget import MIN_MARGIN, MemoryBudget
from memlm.memory.plan import ALLOCATOR_SLACK, TRIM_ROOM, MemoryPlan, StepProfile, plan_memory

MiB = 2**20


def _budget(total_mib=1000):
    return MemoryBudget(total=total_mib * MiB, baseline=200 * MiB, load_overhead=300 * MiB)


def test_plan_arithmetic_caps_and_is_frozen():
    b = _budget()
    prof = StepProfile(matmul_state=10 * MiB, workspace=100 * MiB, left_resident=6 * MiB,
                       resident_after=600 * MiB)
    plan = plan_memory(b, prof, weights=280 * MiB, block_bytes=MiB, block_size=16, kv_dtype="fp16")
    margin = MIN_MARGIN + 6 * MiB + int(b.total * ALLOCATOR_SLACK)
    assert plan.margin == margin
    assert plan.num_blocks == (b.total - 600 * MiB - 100 * MiB - margin) // MiB
    assert plan.kv_pool == plan.num_blocks * MiB and plan.kv_tokens == plan.num_blocks * 16
    assert plan.trim_above == b.total - margin - int(100 * MiB * TRIM_ROOM)
    assert (plan.baseline, plan.load_overhead, plan.matmul_state) == (200 * MiB, 300 * MiB, 10 * MiB)
    assert plan_memory(b, prof, 0, MiB, 16, "fp16", max_blocks=7).num_blocks == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_blocks = 1
    text = plan.describe()
    assert "KV pool" in text and f"{plan.num_blocks} x 16 tokens" in text and "(fp16)" in text


def test_plan_refuses_with_the_size_to_ask_for():
    prof = StepProfile(matmul_state=0, workspace=100 * MiB, left_resident=0, resident_after=845 * MiB)
    with pytest.raises(OutOfBudgetError, match=r"minimal KV cache \(256 tokens\).*--memory-budget (\d+MiB|\d+GiB)$"):
        plan_memory(_budget(), prof, 0, MiB, 16, "fp16")


def test_unbudgeted_plan_describes_itself():
    plan = MemoryPlan(block_size=16, block_bytes=MiB, num_blocks=4, kv_dtype="fp32")
    assert plan.trim_above is None and "no budget" in plan.describe()
