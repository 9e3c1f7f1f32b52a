"""Loading models: one entry point, `load_model`, over GGUF files, Hugging Face directories,
memlm checkpoints and named presets.

Owns: deciding which loader a name or path goes to, and handing the loaded model to the
linear method asked for. Does not know: file formats (`gguf.py`, `hf.py`), tokenizers
(`tokenizer.py`), where presets live (`memlm.models.registry`), or weight formats
(`memlm.models.linear`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from memlm import dtypes
from memlm.errors import ModelLoadError
from memlm.loading.base import LoadedModel
from memlm.loading.gguf import load_gguf
from memlm.loading.hf import PICKLE_SUFFIXES, load_hf_dir, refuse_pickle
from memlm.loading.tokenizer import IncrementalDetokenizer, Tokenizer
from memlm.models.linear import DEFAULT_WEIGHT_DTYPE, available_weight_dtypes, set_weight_dtype
from memlm.models.registry import DEFAULT_MODEL, is_preset, known_names, resolve_preset

__all__ = ["DEFAULT_MODEL", "IncrementalDetokenizer", "LoadedModel", "Tokenizer", "estimate_load_bytes",
           "load_gguf", "load_hf_dir", "load_model"]


def _resolve(name_or_path: str | Path) -> Path:
    """A preset name -> its file; a file inside a checkpoint directory -> the directory."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists() and is_preset(text):
        return resolve_preset(text)
    if path.is_file() and (path.suffix == ".safetensors" or path.name.endswith("config.json")):
        return path.parent
    return path


def estimate_load_bytes(name_or_path: str | Path, dtype=torch.float32) -> tuple[int, int] | None:
    """(weights, largest tensor) in bytes once loaded as `dtype`, read from the file headers only.

    None when the source cannot be sized this way (the loader then reports what is wrong).
    Used to refuse a load that could not fit a memory budget before any weight is read.
    """
    path = _resolve(name_or_path)
    elem = torch.empty((), dtype=dtype).element_size()
    sizes: list[int] = []
    try:
        if path.is_dir():
            import json
            import struct
            for f in sorted(path.glob("*.safetensors")):
                with open(f, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
                for name, info in header.items():
                    if name != "__metadata__":
                        sizes.append(int(torch.Size(info["shape"]).numel()))
        elif path.is_file() and path.suffix not in PICKLE_SUFFIXES:
            from memlm.loading.gguf import open_gguf
            sizes = [int(torch.Size(t.shape).numel()) for t in open_gguf(path).tensors.values()]
    except (OSError, ValueError, KeyError, ModelLoadError):
        return None
    if not sizes:
        return None
    return sum(sizes) * elem, max(sizes) * elem


def load_model(name_or_path: str | Path = DEFAULT_MODEL, weight_dtype=DEFAULT_WEIGHT_DTYPE,
               device=None) -> LoadedModel:
    """Load a preset name ("smollm2-135m-instruct"), a .gguf file, or a model directory.

    Args:
        weight_dtype: the linear method of the model ("fp32", "bf16"; aliases such as
            "bfloat16" accepted). Weights are read as fp32 and then converted layer by layer.
        device: where the weights are loaded and the model will run (None: CPU); the bf16
            method prepacks for the CPU only.
    Raises:
        ModelLoadError (or UnsupportedModelError): with a one-line message saying what to do.
        ValueError: a weight dtype memlm has no linear method for.
    """
    name = dtypes.parse(weight_dtype, allowed=available_weight_dtypes(), what="weight dtype")
    device = torch.device(device if device is not None else "cpu")
    loaded = _load_fp32(name_or_path, device)             # fp32 first: norms and biases stay exact
    if name == DEFAULT_WEIGHT_DTYPE:
        return loaded
    set_weight_dtype(loaded.model, name, device)
    return dataclasses.replace(loaded, weight_bytes=loaded.model.weight_bytes())


def _load_fp32(name_or_path: str | Path, device: torch.device) -> LoadedModel:
    text = str(name_or_path)
    path = _resolve(text)
    if path.is_dir():
        return load_hf_dir(path, device=device)
    if path.suffix == ".gguf" or (path.is_file() and path.suffix not in PICKLE_SUFFIXES):
        return load_gguf(path, device=device)
    if path.suffix in PICKLE_SUFFIXES:
        if path.is_file():
            refuse_pickle(path)
        raise ModelLoadError(f"{path} does not exist (and memlm never loads pickle checkpoints; "
                             "use safetensors or GGUF)")
    raise ModelLoadError(f"model {text!r} is not a known name, a .gguf file or a model directory: "
                         f"use one of {', '.join(known_names())} or a path")
