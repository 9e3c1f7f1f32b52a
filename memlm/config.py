"""Frozen configuration dataclasses and size parsing.

Owns: the shape of a model (`ModelConfig`) and helpers to parse human sizes ("2GiB").
Does not know: how weights are loaded or where memory comes from (see `loading/`, `memory/`).
Every field a user can get wrong is validated in `__post_init__` with a `ValueError` message.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}


def parse_size(text: str | int | float) -> int:
    """Parse "2GiB", "512MB", "1.5 GiB" or a plain byte count into bytes.

    Raises:
        ValueError: for anything that is not a positive size with a known unit.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use a number with a unit such as 512MiB or 2GiB")
    number, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {m.group(2)!r} in {text!r}: use B, KiB, MiB, GiB, KB, MB or GB")
    value = int(number * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(n: int | float) -> str:
    """Bytes as a short human string: 1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


MIXERS = ("attention", "recurrent")
NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu", "none")
POSITIONS = ("rope", "learned", "none")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only model, enough to build it from blocks.

    A model has `num_layers` unique layers (parameter sets). `layer_order` says which unique
    layer runs at each depth, so `(0, 0, 1, 1)` repeats each block in place (MobileLLM) and
    `(0,) * 12` shares one block across all depths (ALBERT). The KV cache is indexed by depth.
    `depth_norms` and `depth_gates` give a shared block a few unshared parameters per depth
    (see `models/blocks.py` `DecoderLayer`).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None          # None: = num_heads (MHA); fewer: GQA
    head_dim: int | None = None              # None: hidden_size // num_heads
    intermediate_size: int | None = None     # None: 4 * hidden_size
    max_position_embeddings: int = 2048
    arch: str = "llama"                      # family name, for info and export only
    norm: str = "rms"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    activation: str = "silu"
    position: str = "rope"
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    mixers: tuple[str, ...] | None = None    # per unique layer; None: all "attention"
    layer_order: tuple[int, ...] | None = None  # per depth; None: range(num_layers)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Per-depth parameters for shared layers (all default off: a plain model is unchanged).
    depth_norms: bool = False                # one RMSNorm weight per depth a layer runs at
    depth_gates: bool = False                # learned scalars on the mixer and MLP outputs, per depth

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        mixers = tuple(self.mixers) if self.mixers is not None else ("attention",) * self.num_layers
        if len(mixers) != self.num_layers or any(m not in MIXERS for m in mixers):
            raise ValueError(f"ModelConfig.mixers must list one of {MIXERS} per unique layer ({self.num_layers}), got {mixers}")
        object.__setattr__(self, "mixers", mixers)
        order = tuple(self.layer_order) if self.layer_order is not None else tuple(range(self.num_layers))
        if not order or any(not 0 <= i < self.num_layers for i in order):
            raise ValueError(f"ModelConfig.layer_order must index unique layers 0..{self.num_layers - 1}, got {order}")
        object.__setattr__(self, "layer_order", order)
        if (self.depth_norms or self.depth_gates) and self.norm != "rms":
            raise ValueError("ModelConfig.depth_norms / depth_gates need norm='rms', got "
                             f"{self.norm!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def depth(self) -> int:
        """Number of layers executed per token (>= num_layers when layers are shared)."""
        return len(self.layer_order)

    @property
    def attention_depths(self) -> tuple[int, ...]:
        """Depth indices whose mixer is attention: the layers that need KV cache."""
        return tuple(d for d, i in enumerate(self.layer_order) if self.mixers[i] == "attention")

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 bytes of K and V one token occupies across all attention layers."""
        return 2 * len(self.attention_depths) * self.num_kv_heads * self.head_dim * 4

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        d = asdict(self)
        d["mixers"] = list(self.mixers)
        d["layer_order"] = list(self.layer_order)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        d = dict(d)
        for k in ("mixers", "layer_order", "eos_token_ids"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)
