"""Linear methods: how a model's projections, embeddings and LM head hold and apply weights.

Owns: the factory that picks a method by canonical weight dtype (`memlm.dtypes`: "fp32",
"bf16", aliases such as "bfloat16" accepted) and converting a built model to another method.
Does not know: any format's details — each lives in a module named after its dtype
(`fp32.py`, `bf16.py`, `int8.py`, `int4.py`) and registers itself, so adding a format is one
new file here: `get_linear_method("int8")` imports `memlm.models.linear.int8` on first use.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

from memlm import dtypes
from memlm.models.linear.base import METHODS, Embedding, Linear, LinearMethod, register

__all__ = ["DEFAULT_WEIGHT_DTYPE", "Embedding", "Linear", "LinearMethod", "available_weight_dtypes",
           "default_method", "get_linear_method", "register", "set_weight_dtype"]

DEFAULT_WEIGHT_DTYPE = "fp32"


def available_weight_dtypes() -> tuple[str, ...]:
    """Canonical weight dtypes with a method: registered ones and modules named after a dtype."""
    found = {m.name for m in pkgutil.iter_modules(__path__) if m.name in dtypes.NAMES} | set(METHODS)
    return tuple(n for n in dtypes.NAMES if n in found)


def get_linear_method(weight_dtype=DEFAULT_WEIGHT_DTYPE, device=None, **options) -> LinearMethod:
    """A fresh method object (one per model) for `weight_dtype` on `device` (None: CPU).

    options: the method's own settings, named in its `options` (int4: `group_size`); None
    values mean the method's default.
    Raises:
        ValueError: one line naming the weight dtypes memlm has methods for, or an option the
            method does not take.
    """
    name = dtypes.parse(weight_dtype, allowed=available_weight_dtypes(), what="weight dtype")
    if name not in METHODS:
        importlib.import_module(f"{__name__}.{name}")     # the module registers its method
    cls = METHODS[name]
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(cls.options))
    if unknown:
        takes = f"takes only {', '.join(cls.options)}" if cls.options else "takes no options"
        raise ValueError(f"{unknown[0]} does not apply to {name} weights ({name} {takes})")
    return cls(device, **given)


def set_weight_dtype(model, weight_dtype, device=None, **options):
    """Convert a built (loaded) `Transformer` in place to the method for `weight_dtype`; returns it.

    Each fp32 weight is freed as soon as its converted copy exists, so the peak is the fp32 model
    plus one layer. device: where the model will run (bf16 prepacks on CPU, not for a GPU).
    options: the method's own settings (`get_linear_method`), e.g. int4's group_size.

    Raises:
        ValueError: an unknown dtype, or a model already converted to another format (load it
            again: conversions start from the weights as loaded).
    """
    method = get_linear_method(weight_dtype, device, **options)
    current = model.linear_method.name
    if current == method.name:
        return model
    if current != DEFAULT_WEIGHT_DTYPE:
        raise ValueError(f"the model's weights are already {current}; load it again to use "
                         f"{method.name} weights")
    model.convert_weights(method)
    return model


def default_method() -> LinearMethod:
    """The fp32 method, for models built without one (training, tests)."""
    return get_linear_method(DEFAULT_WEIGHT_DTYPE, torch.device("cpu"))
