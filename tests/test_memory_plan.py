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


def test_min_budget_is_exactly_the_smallest_that_plans():
    """The size the refusal names holds the minimal pool; one byte less does not (the margin
    grows with the budget, so it is solved for, not added)."""
    from memlm.memory.plan import MIN_KV_TOKENS, min_budget
    prof = StepProfile(matmul_state=0, workspace=30 * MiB, left_resident=5 * MiB, resident_after=250 * MiB)
    kv = -(-MIN_KV_TOKENS // 16) * MiB // 8
    need = min_budget(prof, kv)
    fits = MemoryBudget(total=need, baseline=150 * MiB)
    assert plan_memory(fits, prof, 0, MiB // 8, 16, "fp16").num_blocks >= MIN_KV_TOKENS // 16
    with pytest.raises(OutOfBudgetError, match=r"use --memory-budget \d+MiB$"):
        plan_memory(MemoryBudget(total=need - 2 * MiB, baseline=150 * MiB), prof, 0, MiB // 8, 16, "fp16")


def test_fit_step_keeps_the_configured_step_when_it_fits_and_falls_to_the_floor():
    from memlm.engine.config import step_candidates
    from memlm.memory.plan import fit_step
    cands = step_candidates(2048, 128)
    assert cands == [(2048, 128), (1024, 64), (512, 32), (256, 16), (128, 8), (64, 4)]
    assert step_candidates(2048, 1)[-1] == (64, 1) and step_candidates(64, 4) == [(64, 4)]
    cost = lambda t, s: t * MiB // 8          # noqa: E731  (1 MiB per 8 tokens)
    assert fit_step(10**12, cands, cost) == (2048, 128)
    assert fit_step(100 * MiB, cands, cost) == (512, 32)
    assert fit_step(1, cands, cost) == (64, 4)
