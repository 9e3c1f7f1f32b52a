"""EngineConfig: the engine's knobs, each default defined here once.

Owns: the defaults (module constants, which `SchedulerConfig` below, `ModelRunner` and the CLI's help
derive from) and validation of the knobs. The KV dtype speaks the one dtype vocabulary
(`memlm.dtypes`): fp32, fp16, bf16, int8, int4, int2 (torch spellings accepted), or "auto".
Does not know: how the engine is wired or sized (`llm_engine.py`, `memory/budget.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

from memlm import dtypes
from memlm.kv.prefix_eviction import POLICIES as PREFIX_CACHE_POLICIES
from memlm.config import parse_size
from memlm.kv.policies import KVPolicySpec

MAX_NUM_SEQS = 128               # sequences holding KV at once
MAX_NUM_BATCHED_TOKENS = 2048    # tokens per step (prefill chunks + decodes)
# `memlm serve`'s step (vLLM too sizes its step by usage, smaller for its API server): requests
# arrive together, and a step's prompts all get their first token when it ends, so smaller
# steps let the first prompts answer while the rest prefill, and no decoding stream stalls
# behind a long step. Measured on SmolLM2 (AMD EPYC, 2 vCPU, 2026-12-03, BENCHMARKS.md sixth round):
# multi-turn TTFT p50 928 -> 491 ms (2048 -> 256 tokens, memlm alone); 32 clients' throughput
# about the same (alternated runs: 503-508 against 494-557 tok/s).
SERVE_MAX_NUM_BATCHED_TOKENS = 256
MIN_NUM_BATCHED_TOKENS = 64      # the smallest step a small budget shrinks the step to
TOKENS_PER_SEQ = 16              # a shrunk step keeps at most one sequence per this many tokens
BLOCK_SIZE = 16                  # tokens per KV block
MAX_MODEL_LEN = 2048             # positions per sequence (capped by the model's own context)
GATHER_CAP_TOKENS = 32768        # padded K/V tokens gathered per decode group (torch fallback path)
ADMISSION_HEADROOM = 64          # tokens of growth kept free per running sequence (0: none)
PREFILL_TOKENS_WITH_DECODES = 0  # prefill tokens per step while sequences decode (0: no cap; off:
                                 # 256 measured 0.45x throughput on 128 requests, under load),
PREFILL_TOKENS_PER_DECODE = 8    # ... or this many per decoding sequence when that is more
SMALL_FIRST_CHUNK_TOKENS = 256   # a waiting prompt's uncached rest this small goes before long chunks
ENABLE_PREFIX_CACHING = True     # full KV blocks found again by hash across requests
PREFIX_CACHE_POLICY = "cost"     # which cached block goes first (memlm.kv.prefix_eviction): lru cost
KV_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4", "int2")   # int4 / int2: KIVI (memlm.kv.codecs)
WARM_FRACTION = 0.0              # of the budget's KV memory kept for the warm (compressed RAM) tier
DISK_BUDGET = "4GiB"             # bound on the cold tier's files in session_dir
KV_POLICY = "full"               # KV eviction policy (memlm.kv.policies): full window sinks h2o snap
KV_WINDOW = 1020                 # recent tokens kept by window / sinks (StreamingLLM's 4 + 1,020)
KV_SINKS = 4                     # first tokens always kept by sinks / h2o / snap
KV_BUDGET = 1024                 # most cached tokens per sequence under h2o / snap


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs. `num_kv_blocks` overrides the budget's choice (tests, experiments).

    kv_dtype "auto": fp16 on CPU with the native decode kernel, else fp32.
    """

    max_num_seqs: int = MAX_NUM_SEQS
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    block_size: int = BLOCK_SIZE
    kv_dtype: str = dtypes.AUTO
    num_kv_blocks: int | None = None
    max_model_len: int = MAX_MODEL_LEN
    gather_cap_tokens: int = GATHER_CAP_TOKENS
    admission_headroom: int = ADMISSION_HEADROOM
    prefill_tokens_with_decodes: int = PREFILL_TOKENS_WITH_DECODES   # 0: prefill takes the whole step
    enable_prefix_caching: bool = ENABLE_PREFIX_CACHING   # off for models with recurrent layers
    prefix_cache_policy: str = PREFIX_CACHE_POLICY
    warm_fraction: float = WARM_FRACTION  # > 0: swapped-out requests and sessions wait in RAM
    disk_budget: int | str = DISK_BUDGET  # cold tier size; used when session_dir is given
    session_dir: str | None = None        # cold tier: persistent chat sessions (+ swap spill)
    kv_policy: str = KV_POLICY            # a request's SamplingParams.kv_policy overrides these four
    kv_window: int = KV_WINDOW
    kv_sinks: int = KV_SINKS
    kv_budget: int = KV_BUDGET

    def __post_init__(self):
        object.__setattr__(self, "kv_dtype", dtypes.parse(self.kv_dtype, KV_DTYPES, "kv_dtype",
                                                          allow_auto=True))
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.admission_headroom < 0:
            raise ValueError(f"admission_headroom must be >= 0, got {self.admission_headroom}")
        if self.prefill_tokens_with_decodes < 0:
            raise ValueError(f"prefill_tokens_with_decodes must be >= 0, got {self.prefill_tokens_with_decodes}")
        if self.prefix_cache_policy not in PREFIX_CACHE_POLICIES:
            raise ValueError(f"prefix_cache_policy must be one of {', '.join(PREFIX_CACHE_POLICIES)}, "
                             f"got {self.prefix_cache_policy!r}")
        KVPolicySpec.resolve(self.kv_policy, None, None, None, self)     # raises on a bad one
        if not 0.0 <= self.warm_fraction <= 0.9:
            raise ValueError(f"warm_fraction must be in [0, 0.9], got {self.warm_fraction}")
        object.__setattr__(self, "disk_budget", parse_size(self.disk_budget))
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


def step_candidates(max_num_batched_tokens: int, max_num_seqs: int) -> list[tuple[int, int]]:
    """(tokens, seqs) steps a memory budget may run, largest first: the configured step, then
    halvings down to MIN_NUM_BATCHED_TOKENS, each with at most one sequence per TOKENS_PER_SEQ
    tokens (no fewer than 1). A configured step at or below the floor is the only candidate."""
    out = [(max_num_batched_tokens, max_num_seqs)]
    tokens = max_num_batched_tokens
    while tokens // 2 >= MIN_NUM_BATCHED_TOKENS:
        tokens //= 2
        out.append((tokens, max(1, min(max_num_seqs, tokens // TOKENS_PER_SEQ))))
    return out


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling knobs, the defaults above (the engine passes its own)."""

    max_num_seqs: int = MAX_NUM_SEQS                      # sequences holding KV at once
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS  # tokens per step
    max_model_len: int = MAX_MODEL_LEN                    # positions per sequence
    share_prompt_blocks: bool = True                      # n > 1 forks share prompt blocks
    admission_headroom: int = ADMISSION_HEADROOM          # growth kept free per running seq
    prefill_tokens_with_decodes: int = PREFILL_TOKENS_WITH_DECODES   # prefill cap while decoding

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("admission_headroom", "prefill_tokens_with_decodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"SchedulerConfig.{name} must be >= 0, got {getattr(self, name)}")
