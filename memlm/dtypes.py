"""The one dtype vocabulary of memlm: weights, KV cache and students all say `fp32`, `fp16`,
`bf16`, `int8`, `int4` or `int2`, and accept the torch spellings (`float32`, `torch.float16`,
`bfloat16`, ...) as aliases.

Owns: the canonical names, their aliases, bytes per element, and the torch dtype that stores
each (packed sub-byte codecs are stored in uint8 / int8 containers by their own codec).
Does not know: which names a given component supports; each asks `parse(value, allowed=...)`
with its own set and gets one error line listing exactly those.
"""
from __future__ import annotations

import torch

NAMES = ("fp32", "fp16", "bf16", "int8", "int4", "int2")
AUTO = "auto"

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "int2": 2}
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
_ALIASES = {"float32": "fp32", "float": "fp32", "f32": "fp32",
            "float16": "fp16", "half": "fp16", "f16": "fp16",
            "bfloat16": "bf16",
            "qint8": "int8", "q8": "int8", "q4": "int4"}


def parse(value, allowed=NAMES, what: str = "dtype", allow_auto: bool = False) -> str:
    """Canonical name of `value` (a name, an alias, or a torch.dtype); ValueError names the choices.

    Args:
        allowed: the canonical names this caller supports.
        what: how the error line names the setting, e.g. "--kv-dtype".
        allow_auto: also accept "auto" (returned as is).
    """
    if isinstance(value, torch.dtype):
        key = str(value).replace("torch.", "")
    elif isinstance(value, str):
        key = value.strip().lower().replace("torch.", "")
    else:
        key = None
    if allow_auto and key == AUTO:
        return AUTO
    name = _ALIASES.get(key, key)
    if name not in allowed:
        choices = ([AUTO] if allow_auto else []) + list(allowed)
        raise ValueError(f"{what} must be one of {', '.join(choices)} (or a torch spelling such as "
                         f"float16), got {value!r}")
    return name


def choices(allowed=NAMES, allow_auto: bool = False) -> list[str]:
    """Names and aliases an argparse option accepts (help shows the canonical ones)."""
    canon = ([AUTO] if allow_auto else []) + list(allowed)
    return canon + [a for a, n in _ALIASES.items() if n in allowed]


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of a canonical name that has one (fp32, fp16, bf16, int8)."""
    if name not in TORCH:
        raise ValueError(f"{name} has no torch dtype of its own: it is a packed codec")
    return TORCH[name]


def bytes_per_element(name: str) -> float:
    return BITS[parse(name)] / 8


def name_of(dtype: torch.dtype) -> str:
    """Canonical name of a torch dtype (fp32 for torch.float32, ...)."""
    return parse(dtype)
