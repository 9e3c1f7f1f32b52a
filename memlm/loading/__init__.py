"""Loading models: one entry point, `load_model`, over GGUF files, Hugging Face directories,
memlm checkpoints and named presets.

Owns: deciding which loader a name or path goes to, and handing the loaded model to the
linear method asked for. Does not know: file formats (`gguf.py`, `hf.py`), tokenizers
(`tokenizer.py`), where presets live (`memlm.models.registry`), or weight formats
(`memlm.models.linear`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from memlm.errors import ModelLoadError
from memlm.loading.base import LoadedModel
from memlm.loading.gguf import load_gguf
from memlm.loading.hf import PICKLE_SUFFIXES, load_hf_dir, refuse_pickle
from memlm.loading.tokenizer import IncrementalDetokenizer, Tokenizer
from memlm.models.linear import DEFAULT_WEIGHT_DTYPE, get_linear_method
from memlm.models.registry import DEFAULT_MODEL, is_preset, known_names, resolve_preset

__all__ = ["DEFAULT_MODEL", "IncrementalDetokenizer", "LoadedModel", "Tokenizer", "estimate_load_bytes",
           "load_gguf", "load_hf_dir", "load_model", "native_weight_dtype"]


def _resolve(name_or_path: str | Path) -> Path:
    """A preset name -> its file; a file inside a checkpoint directory -> the directory."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists() and is_preset(text):
        return resolve_preset(text)
    if path.is_file() and (path.suffix == ".safetensors" or path.name.endswith("config.json")):
        return path.parent
    return path


# Tensors held as lookup tables / the LM head (by GGUF, HF or memlm name): quantized methods
# keep them as int8 rows, whatever their projections' codec.
_TABLE_RE = re.compile(r"(^|\.)(token_embd|position_embd|output|embed_tokens|embed|pos_embed|lm_head|wte|wpe)"
                       r"\.weight$")


def estimate_load_bytes(name_or_path: str | Path, weight_dtype=DEFAULT_WEIGHT_DTYPE,
                        **options) -> tuple[int, int] | None:
    """(weights, largest tensor) in bytes once loaded as `weight_dtype` (its linear method's
    `stored_bytes`), read from the file headers only. The second is the loader's transient
    copy: the largest tensor in fp32 (each is dequantized to fp32 before it is converted),
    except GGUF blocks the method keeps (`LinearMethod.keeps_blocks`), copied as they are.

    None when the source cannot be sized this way (the loader then reports what is wrong).
    Used to refuse a load that could not fit a memory budget before any weight is read.
    options: the method's settings (int4: group_size).
    """
    path = _resolve(name_or_path)
    method = get_linear_method(weight_dtype, torch.device("cpu"), **options)
    shapes: dict[str, tuple[int, ...]] = {}
    codecs: dict[str, str] = {}          # GGUF tensor -> its ggml type, lower case ("q4_1", "f16")
    try:
        if path.is_dir():
            import json
            import struct
            for f in sorted(path.glob("*.safetensors")):
                with open(f, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
                shapes.update({name: tuple(info["shape"]) for name, info in header.items()
                               if name != "__metadata__"})
        elif path.is_file() and path.suffix not in PICKLE_SUFFIXES:
            from memlm.loading.gguf import open_gguf
            tensors = open_gguf(path).tensors
            shapes = {name: tuple(t.shape) for name, t in tensors.items()}
            codecs = {name: t.ggml_type.name.lower() for name, t in tensors.items()}
    except (OSError, ValueError, KeyError, ModelLoadError):
        return None
    if not shapes:
        return None
    weights = sum(method.stored_bytes(shape, bool(_TABLE_RE.search(name)), codecs.get(name))
                  for name, shape in shapes.items())
    def transient(name: str, shape: tuple[int, ...]) -> int:    # a tensor's copy while it loads
        table, codec = bool(_TABLE_RE.search(name)), codecs.get(name)
        if codec is not None and len(shape) == 2 and method.keeps_blocks(codec, table):
            return method.stored_bytes(shape, table, codec)      # its blocks, copied once
        return math.prod(shape) * 4                              # dequantized to fp32
    return weights, max(transient(name, shape) for name, shape in shapes.items())


# A GGUF file's own precision -> the weight dtype that keeps it (`native_weight_dtype`)
_OWN_DTYPE = {"q4_0": "int4", "q4_1": "int4", "q8_0": "int8", "f16": "bf16", "bf16": "bf16",
              "q4_k": "int4", "q5_k": "int4", "q6_k": "int8"}      # both keep every K-quant


def native_weight_dtype(name_or_path: str | Path) -> str | None:
    """The weight dtype that keeps a GGUF file's own precision (what most of its projection
    weights are stored in): Q4_0 / Q4_1 / Q4_K / Q5_K -> int4 (blocks kept as loaded), Q8_0 /
    Q6_K -> int8 (blocks kept), F16 / BF16 -> bf16. None for anything else (F32, other types,
    not a GGUF file)."""
    path = _resolve(name_or_path)
    if not path.is_file() or path.suffix in PICKLE_SUFFIXES:
        return None
    try:
        from memlm.loading.gguf import open_gguf
        tensors = open_gguf(path).tensors.values()
    except (OSError, ValueError, ModelLoadError):
        return None
    count: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) == 2 and not _TABLE_RE.search(t.name):
            kind = t.ggml_type.name.lower()
            count[kind] = count.get(kind, 0) + math.prod(t.shape)
    return _OWN_DTYPE.get(max(count, key=count.get)) if count else None


def load_model(name_or_path: str | Path = DEFAULT_MODEL, weight_dtype=DEFAULT_WEIGHT_DTYPE,
               device=None, **options) -> LoadedModel:
    """Load a preset name ("smollm2-135m-instruct"), a .gguf file, or a model directory.

    Args:
        weight_dtype: the linear method of the model ("fp32", "bf16", "int8", "int4"; aliases
            such as "bfloat16" accepted). Weights are read as fp32; for any other method each
            part (a decoder layer, an embedding) is converted as soon as it is read, so the
            peak stays near the converted model plus one part in fp32.
        device: where the weights are loaded and the model will run (None: CPU); the bf16
            method prepacks for the CPU only, int8 / int4 run on the CPU only.
        options: the method's settings (int4: group_size).
    Raises:
        ModelLoadError (or UnsupportedModelError): with a one-line message saying what to do.
        ValueError: a weight dtype memlm has no linear method for, or an option it does not take.
    """
    device = torch.device(device if device is not None else "cpu")
    method = get_linear_method(weight_dtype, device, **options)
    loaded = _load(name_or_path, device, None if method.name == DEFAULT_WEIGHT_DTYPE else method)
    return dataclasses.replace(loaded, weight_bytes=loaded.model.weight_bytes())


def _load(name_or_path: str | Path, device: torch.device, method) -> LoadedModel:
    text = str(name_or_path)
    path = _resolve(text)
    if path.is_dir():
        return load_hf_dir(path, device=device, method=method)
    if path.suffix == ".gguf" or (path.is_file() and path.suffix not in PICKLE_SUFFIXES):
        return load_gguf(path, device=device, method=method)
    if path.suffix in PICKLE_SUFFIXES:
        if path.is_file():
            refuse_pickle(path)
        raise ModelLoadError(f"{path} does not exist (and memlm never loads pickle checkpoints; "
                             "use safetensors or GGUF)")
    raise ModelLoadError(f"model {text!r} is not a known name, a .gguf file or a model directory: "
                         f"use one of {', '.join(known_names())} or a path")
