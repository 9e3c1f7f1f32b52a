"""EngineConfig: the engine's knobs, each default defined here once.

Owns: the defaults (module constants, which `SchedulerConfig`, `ModelRunner` and the CLI's help
derive from) and validation of the knobs. The KV dtype speaks the one dtype vocabulary
(`memlm.dtypes`): fp32, fp16, bf16, int8 (torch spellings accepted), or "auto".
Does not know: how the engine is wired or sized (`llm_engine.py`, `memory/budget.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

from memlm import dtypes

MAX_NUM_SEQS = 128               # sequences holding KV at once
MAX_NUM_BATCHED_TOKENS = 2048    # tokens per step (prefill chunks + decodes)
BLOCK_SIZE = 16                  # tokens per KV block
MAX_MODEL_LEN = 2048             # positions per sequence (capped by the model's own context)
GATHER_CAP_TOKENS = 32768        # padded K/V tokens gathered per decode group (torch fallback path)
ADMISSION_HEADROOM = 64          # tokens of growth kept free per running sequence (0: none)
KV_DTYPES = ("fp32", "fp16", "bf16", "int8")


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

    def __post_init__(self):
        object.__setattr__(self, "kv_dtype", dtypes.parse(self.kv_dtype, KV_DTYPES, "kv_dtype",
                                                          allow_auto=True))
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.admission_headroom < 0:
            raise ValueError(f"admission_headroom must be >= 0, got {self.admission_headroom}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
