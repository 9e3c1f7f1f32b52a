"""The paged engine: step() = schedule -> run -> update, plus start-up sizing and metrics.

Owns: wiring (budget -> KV block count -> KVCacheManager + KVStore; Scheduler; ModelRunner), the
warm-up profile that measures the step workspace, request bookkeeping (add / abort / which
requests changed), and `EngineMetrics`.
Does not know: tensor code (runner, kv.store), block bookkeeping (kv.manager) or scheduling
policy (scheduler).
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass

import torch

from memlm import dtypes
from memlm.config import format_size
from memlm.engine.config import EngineConfig, step_candidates
from memlm.engine.eviction import PolicyStep
from memlm.engine.request import Request
from memlm.engine.runner import ModelRunner
from memlm.engine.config import SchedulerConfig
from memlm.engine.scheduler import Scheduler
from memlm.errors import OutOfBudgetError
from memlm.memory import budget as mem
from memlm.memory import resident
from memlm.memory.plan import (ALLOCATOR_SLACK, MIN_KV_TOKENS, NEED_HEADROOM, NEED_STEP, MemoryPlan,
                               StepProfile, fit_step, min_budget, plan_memory)
from memlm.kernels import attention as paged_attention
from memlm.kv.cost import CostModel
from memlm.kv.manager import KVCacheManager
from memlm.kv.prefix_cache import PrefixCache
from memlm.kv.prefix_eviction import make_policy
from memlm.kv.offload import build_offload
from memlm.kv.store import KVStore

TRIM_EVERY_STEPS = 32
GPU_KV_FRACTION = 0.5   # of free GPU memory for the KV pool when running on CUDA


@dataclass
class EngineMetrics:
    """A snapshot of the engine, readable from Python (`llm.metrics`) and printed by bench."""

    num_kv_blocks: int
    block_size: int
    kv_blocks_used: int
    kv_blocks_free: int
    fragmentation: float            # now: allocated-but-unused slots / allocated slots
    mean_fragmentation: float       # averaged over steps that held blocks
    num_preemptions: int
    num_waiting: int
    num_running: int
    prefill_tokens: int
    decode_tokens: int              # all decode tokens, also those riding in prefill steps
    prefill_seconds: float          # time of steps that contained prefill tokens
    decode_seconds: float           # time of decode-only steps
    num_steps: int
    decode_steps: int = 0           # decode-only steps
    decode_step_tokens: int = 0     # tokens of decode-only steps (what decode_seconds timed)
    num_swaps: int = 0              # preemptions that saved the KV to a tier instead of dropping it
    max_preemptions_per_seq: int = 0
    warm_bytes: int = 0             # compressed KV held by the warm tier now (of warm_capacity)
    warm_capacity: int = 0
    cold_bytes: int = 0             # KV files in the session directory now (of the disk budget)
    session_hits: int = 0           # turns that resumed from a saved session
    session_tokens_restored: int = 0
    compression_ratio: float = 0.0  # raw / stored bytes of every entry saved so far
    prefix_tier_demotions: int = 0  # evicted cached-prefix blocks kept in the warm / cold tier
    prefix_tier_restored_blocks: int = 0   # of those, copied back into the pool by a later hit
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0      # of those, found cached (not recomputed)
    prefix_cache_blocks: int = 0    # blocks findable by hash now (in use or evictable)
    prefix_cache_evictions: int = 0 # cached blocks reclaimed for other use

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_step_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def mean_decode_batch(self) -> float:
        """Sequences per decode-only step."""
        return self.decode_step_tokens / self.decode_steps if self.decode_steps else 0.0


class LLMEngine:
    def __init__(self, model, config: EngineConfig, budget: mem.MemoryBudget | None = None,
                 device: torch.device | str = "cpu", verbose: bool = False):
        self.model, self.config, self.budget = model, config, budget
        self.device = torch.device(device)
        cfg = model.cfg
        max_len = min(config.max_model_len, cfg.max_position_embeddings)
        self.runner = ModelRunner(model, self.device, config.block_size, config.gather_cap_tokens)
        if config.kv_dtype != dtypes.AUTO:
            kv_dtype = config.kv_dtype
        elif self.device.type == "cpu" and paged_attention.available():
            # Decode attention is memory-bound: fp16 K/V halve both the pool and the bytes read,
            # and the native kernel widens them to fp32 on load (attention error ~1e-4).
            kv_dtype = "fp16"
        else:
            kv_dtype = "fp32"

        def block_bytes(dtype):
            return KVStore.bytes_per_block(len(cfg.attention_depths), config.block_size,
                                           cfg.num_kv_heads, cfg.head_dim, dtype)
        self.kv_dtype = kv_dtype        # canonical name (memlm.dtypes)
        self.plan = self._plan(budget, max_len, block_bytes(kv_dtype), verbose)
        config = self.config             # a small budget may have shrunk the step (_fit_step)
        num_blocks = self.plan.num_blocks
        self.kv = KVCacheManager(num_blocks, config.block_size, self._prefix_cache())
        self.runner.store = KVStore(cfg.attention_depths, num_blocks, config.block_size,
                                    cfg.num_kv_heads, cfg.head_dim, kv_dtype, self.device,
                                    window_stages=self._window_stages())
        self.cost = CostModel()
        self.offload = build_offload(model, self.runner.store, self.plan.kv_dtype, self.cost,
                                     self.plan.warm_bytes, config.session_dir, config.disk_budget)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   max_len, admission_headroom=config.admission_headroom,
                                                   prefill_tokens_with_decodes=config.prefill_tokens_with_decodes),
                                   self.kv, can_share_blocks="recurrent" not in cfg.mixers,
                                   offload=self.offload,
                                   policy=PolicyStep(self.kv, config, rotary=cfg.position == "rope",
                                                     per_token_kv=self.runner.store.window is None))
        if verbose and budget is not None:
            print(f"memlm: memory plan\n{self.describe_plan()}", file=sys.stderr, flush=True)
        # The heap keeps freed activations for the next step; trim it when RSS nears the budget.
        self._trim_above = self.plan.trim_above if self.device.type == "cpu" else None
        self.requests: dict[str, Request] = {}
        self._arrivals = 0
        self._seq_ids = itertools.count()      # sequence ids are unique per engine
        self._stats = dict(prefill_tokens=0, decode_tokens=0, prefill_seconds=0.0,
                           decode_seconds=0.0, steps=0, frag_sum=0.0, frag_steps=0,
                           decode_steps=0, decode_step_tokens=0)

    def _prefix_cache(self) -> PrefixCache | None:
        """The prefix cache, unless switched off or the model has recurrent layers (their state
        is not in the KV blocks, so a sequence cannot resume from a cached prefix)."""
        cfg = self.model.cfg
        if (not self.config.enable_prefix_caching or "recurrent" in cfg.mixers
                or self.config.kv_policy != "full"):     # evicting policies rewrite blocks
            return None
        # A token's attention costs about as much as its matmuls at ~6 x hidden context tokens.
        policy = make_policy(self.config.prefix_cache_policy, self.config.block_size,
                             attention_scale=6.0 * cfg.hidden_size)
        return PrefixCache(self.config.block_size, policy, salt=dtypes.name_of(self.kv_dtype).encode())

    def _plan(self, budget: mem.MemoryBudget | None, max_len: int, block_bytes: int,
              verbose: bool = False) -> MemoryPlan:
        """Size the KV pool: from the budget and a measured profile on CPU, else a fixed share."""
        if budget is not None and self.device.type == "cpu":
            dropped = resident.drop_text_pages()       # what the load faulted in: room is exact
            # An explicit pool bounds every sequence's context, so the profile need not go further.
            ctx = min(max_len, self.config.num_kv_blocks * self.config.block_size) \
                if self.config.num_kv_blocks else max_len
            self._fit_step(budget, ctx, block_bytes, verbose)
            config, kv_name = self.config, dtypes.name_of(self.kv_dtype)
            profile = self._profile(ctx)
            profile = dataclasses.replace(profile, text_dropped=profile.text_dropped + dropped)
            # Never more than every sequence at full length can use: a big default budget should
            # not turn into gigabytes of zeroed KV pages nobody can reach.
            usable = config.max_num_seqs * -(-max_len // config.block_size)
            plan = plan_memory(budget, profile, self.model.weight_bytes(), block_bytes, config.block_size,
                               kv_name, max_blocks=min(config.num_kv_blocks or usable, usable),
                               warm_fraction=config.warm_fraction, kv_window=self._window_bytes())
            return dataclasses.replace(plan, step_tokens=config.max_num_batched_tokens,
                                       step_seqs=config.max_num_seqs)
        config, kv_name = self.config, dtypes.name_of(self.kv_dtype)
        num_blocks = config.num_kv_blocks
        if num_blocks is None and self.device.type == "cuda":   # GPU memory is not in the RSS budget
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * GPU_KV_FRACTION) // block_bytes
        if num_blocks is None:   # no budget: room for every sequence at up to 1024 tokens
            num_blocks = config.max_num_seqs * -(-min(max_len, 1024) // config.block_size)
        num_blocks = max(1, num_blocks)   # outside a budget the warm tier adds its share on top
        warm = int(num_blocks * block_bytes * config.warm_fraction / (1 - config.warm_fraction))
        return MemoryPlan(block_size=config.block_size, block_bytes=block_bytes,
                          num_blocks=num_blocks, kv_dtype=kv_name, warm_bytes=warm,
                          kv_window=self._window_bytes())

    def _window_stages(self) -> int:
        """Stages of a block codec's fp16 window: one per running sequence's partial block, and
        a spare for a block completed and another started in the same step."""
        return self.config.max_num_seqs + 1

    def _window_bytes(self) -> int:
        """The fp16 window of a block codec (int4 / int2), planned beside the pool; else 0."""
        cfg = self.model.cfg
        return KVStore.window_bytes(len(cfg.attention_depths), self._window_stages(), self.config.block_size,
                                    cfg.num_kv_heads, cfg.head_dim, self.kv_dtype)

    def _fit_step(self, budget: mem.MemoryBudget, max_len: int, block_bytes: int, verbose: bool) -> None:
        """Shrink the step (max_num_batched_tokens, max_num_seqs) when the budget cannot hold the
        configured one beside a minimal KV cache, down to MIN_NUM_BATCHED_TOKENS, by the runner's
        estimate (`ModelRunner.estimate_step_bytes`); the profile then measures the chosen step.
        A budget that holds the configured step keeps it, so large budgets run as before. When
        not even the smallest step fits, refuse before the warm-up could run over the budget."""
        config = self.config
        candidates = step_candidates(config.max_num_batched_tokens, config.max_num_seqs)
        kv_min = -(-MIN_KV_TOKENS // config.block_size) * block_bytes + self._window_bytes()
        rss = mem.current_rss()
        room = budget.total - rss - mem.MIN_MARGIN - int(budget.total * ALLOCATOR_SLACK) - kv_min
        estimate = lambda t, s: self.runner.estimate_step_bytes(t, s, max_len)  # noqa: E731
        tokens, seqs = fit_step(room, candidates, estimate)
        # Refuse here only when the floor step's warm-up and profile could themselves run over
        # the budget; otherwise the profile measures it and the plan names the measured need
        # (the estimate is over the measured figure at small steps: 67 vs 53 MiB on SmolLM2).
        if rss + estimate(tokens, seqs) > budget.total:
            need = min_budget(StepProfile(0, estimate(tokens, seqs), 0, rss), kv_min)
            raise OutOfBudgetError(f"memory budget {format_size(budget.total)} cannot hold the model, a "
                                   f"{tokens}-token step and a minimal KV cache ({MIN_KV_TOKENS} tokens): "
                                   f"needs about {format_size(need)}; use --memory-budget "
                                   f"{mem.round_up(need + NEED_HEADROOM, NEED_STEP)}")
        if (tokens, seqs) == (config.max_num_batched_tokens, config.max_num_seqs):
            return
        self.config = dataclasses.replace(config, max_num_batched_tokens=tokens, max_num_seqs=seqs)
        if verbose:
            print(f"memlm: a {format_size(budget.total)} budget cannot hold steps of "
                  f"{config.max_num_batched_tokens} tokens x {config.max_num_seqs} sequences; running "
                  f"steps of {tokens} tokens x {seqs}", file=sys.stderr, flush=True)

    def _profile(self, max_len: int) -> StepProfile:
        """Measure the peak of the largest step (vLLM's warm-up profile) and what it leaves.

        Between the warm-up and the profile the clean library code pages are handed back to the
        page cache (`memory/resident.py`); one unmeasured step then faults back the code a step
        runs, so the measured steps see it as resident, and only that code is kept."""
        start = mem.current_rss()
        self.runner.warm_up(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        mem.release_free_heap()
        warm = mem.current_rss()
        dropped = resident.drop_text_pages()
        step = lambda: self.runner.profile(self.config.max_num_batched_tokens,  # noqa: E731
                                           self.config.max_num_seqs, max_len, self.kv_dtype)
        if dropped:
            step()                    # unmeasured: faults back the code a step runs
        mem.release_free_heap()
        before = mem.current_rss()
        with mem.phase_peak() as measured:   # two steps: the second runs on the heap the first
            step()                           # left (as all steps do)
            step()
        peak = measured.peak
        mem.release_free_heap()
        after = mem.current_rss()
        # What the steps left behind for good (thread pools, BLAS buffers) is not workspace.
        return StepProfile(matmul_state=max(0, warm - start), workspace=max(0, peak - before),
                           left_resident=max(0, after - before), resident_after=after,
                           text_dropped=dropped)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        request.arrival = self._arrivals
        self._arrivals += 1
        request.assign_seq_ids(self._seq_ids)
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.abort(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """schedule -> run -> update. Returns the requests that changed (finished ones last time)."""
        sched = self.scheduler.schedule()
        changed: dict[str, Request] = {}
        if not sched.is_empty:
            out = self.runner.execute(sched)
            self.scheduler.update(sched, out.sampled)
            for s in sched.scheduled:
                req = s.seq.request
                changed[req.request_id] = req
                if s.seq.seq_id in out.prompt_logprobs:
                    req.prompt_logprobs.extend(out.prompt_logprobs[s.seq.seq_id])
            self._record(out)
        elif sched.freed_seq_ids:
            self.runner.drop_states(sched.freed_seq_ids)
        for rid, req in list(self.requests.items()):
            if req.finished:
                changed[rid] = req
                del self.requests[rid]
        return list(changed.values())

    def _record(self, out) -> None:
        st = self._stats
        st["steps"] += 1
        if self.device.type == "cpu" and (st["steps"] % TRIM_EVERY_STEPS == 0 or (
                self._trim_above is not None and mem.current_rss() > self._trim_above)):
            mem.release_free_heap()     # freed heap pages back to the OS: RSS tracks live data
        if out.num_prefill_tokens:
            st["prefill_seconds"] += out.seconds
            self.cost.observe_prefill(out.num_prefill_tokens, out.seconds)   # recompute's price
        else:
            st["decode_seconds"] += out.seconds
            st["decode_steps"] += 1
            st["decode_step_tokens"] += out.num_decode_tokens
        st["prefill_tokens"] += out.num_prefill_tokens
        st["decode_tokens"] += out.num_decode_tokens
        if self.kv.num_used_blocks:
            st["frag_sum"] += self.kv.fragmentation(self.scheduler.running)
            st["frag_steps"] += 1

    @property
    def metrics(self) -> EngineMetrics:
        st = self._stats
        return EngineMetrics(
            num_kv_blocks=self.kv.num_blocks, block_size=self.kv.block_size,
            kv_blocks_used=self.kv.num_used_blocks, kv_blocks_free=self.kv.num_free_blocks,
            fragmentation=self.kv.fragmentation(self.scheduler.running),
            mean_fragmentation=st["frag_sum"] / st["frag_steps"] if st["frag_steps"] else 0.0,
            num_preemptions=self.scheduler.num_preemptions, num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running, prefill_tokens=st["prefill_tokens"],
            decode_tokens=st["decode_tokens"], prefill_seconds=st["prefill_seconds"],
            decode_seconds=st["decode_seconds"], num_steps=st["steps"], decode_steps=st["decode_steps"],
            decode_step_tokens=st["decode_step_tokens"], num_swaps=self.scheduler.num_swaps,
            max_preemptions_per_seq=self.scheduler.max_preemptions_per_seq,
            **self._prefix_cache_metrics(),
            **(self.offload.metrics() if self.offload is not None else {}))

    def _prefix_cache_metrics(self) -> dict:
        cache = self.kv.cache
        if cache is None:
            return {}
        return dict(prefix_cache_queries=cache.num_queried_tokens, prefix_cache_hits=cache.num_hit_tokens,
                    prefix_cache_blocks=cache.num_cached_blocks, prefix_cache_evictions=cache.num_evictions)

    def describe_plan(self) -> str:
        """The memory plan (budget ledger and KV pool), a few lines."""
        return self.plan.describe()


def format_metrics(m: EngineMetrics) -> str:
    return (f"KV blocks {m.kv_blocks_used}/{m.num_kv_blocks} used, fragmentation "
            f"{m.mean_fragmentation:.1%} (mean), preemptions {m.num_preemptions}, "
            f"prefill {m.prefill_tokens_per_s:.0f} tok/s, decode {m.decode_tokens_per_s:.0f} tok/s, "
            f"prefix cache {m.prefix_cache_hit_rate:.1%} of {m.prefix_cache_queries} prompt tokens hit "
            f"({m.prefix_cache_evictions} evictions)")


