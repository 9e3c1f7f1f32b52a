"""GGUF (llama.cpp) files -> `LoadedModel`: config from metadata, weights dequantized tensor
by tensor, tokenizer and chat template from `tokenizer.*` metadata.

Owns: GGUF metadata -> `ModelConfig` for the `llama`, `qwen2` and `gpt2` architectures, GGUF
tensor names -> memlm names, undoing llama.cpp's q/k row permutation, and turning every way a
GGUF file can be bad into a `ModelLoadError` with a one-line message.
Does not know: the tokenizer's internals (`tokenizer.py`) or how weights are kept afterwards.
The file is memory-mapped (`gguf_file.GGUFFile`); each tensor is dequantized to fp32, copied into
the model, and its mapped pages are dropped, so the file is never held twice. A Q8_0 / Q4_0 /
Q4_1 / Q4_K / Q5_K / Q6_K tensor whose linear method keeps that codec (`LinearMethod.keeps_blocks`)
is copied as its blocks instead, once, from the map (rows permuted or split as bytes), never
widened to fp32 (`memlm.kernels.gemv`, K-quants `memlm.kernels.kquant`).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

from memlm.config import ModelConfig
from memlm.kernels import kquant
from memlm.errors import MemlmError, ModelLoadError, UnsupportedModelError
from memlm.loading.base import LoadedModel, WeightSink
from memlm.loading.gguf_file import SUPPORTED_TYPES, GGUFFile, TensorInfo
from memlm.loading.tokenizer import Tokenizer

SUPPORTED_ARCHS = ("llama", "qwen2", "gpt2")

# GGUF tensor suffix inside a block -> memlm suffix inside `layers.{i}.`
_BLOCK_NAMES = {
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
    "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj", "attn_qkv": "attn.qkv",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed", "position_embd": "pos_embed", "output_norm": "final_norm",
              "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path) -> GGUFFile:
    """Open and parse a GGUF file's header, turning every failure into a ModelLoadError."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist: check the path or use a known model name")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file: pass a .gguf file or a model directory")
    try:
        return GGUFFile(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def config_from_metadata(meta: dict, tensor_names: set[str], path: Path) -> ModelConfig:
    """Build the ModelConfig a GGUF file describes (llama / qwen2 / gpt2)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; memlm loads "
                                    f"{', '.join(SUPPORTED_ARCHS)} models")

    def get(key, default=None, required=True):
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}; re-convert the model "
                                 "with a current llama.cpp")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling not in ("none", None) and float(get("rope.scaling.factor", 1.0, required=False)) != 1.0:
        raise UnsupportedModelError(f"{path}: RoPE scaling {scaling!r} is not supported; use a model "
                                    "without rope scaling")
    head_dim = int(get("attention.key_length", hidden // heads, required=False))
    if arch != "gpt2" and int(get("rope.dimension_count", head_dim, required=False)) != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings are not supported")
    vocab = get("vocab_size", len(meta.get("tokenizer.ggml.tokens") or []) or None)
    common = dict(
        vocab_size=int(vocab), hidden_size=hidden, num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads, required=False)), head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")), arch=arch,
        max_position_embeddings=int(get("context_length", 2048, required=False)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                            if k in meta),
    )
    if arch == "gpt2":
        return ModelConfig(**common, norm="layer", norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
                           mlp="gelu", activation="gelu_tanh", position="learned",
                           qkv_bias=True, o_bias=True, mlp_bias=True)
    return ModelConfig(**common, norm="rms", norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                       mlp="swiglu", activation="silu", position="rope",
                       rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
                       qkv_bias="blk.0.attn_q.bias" in tensor_names,
                       o_bias="blk.0.attn_output.bias" in tensor_names)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf `permute`).

    llama.cpp stores each head's rows interleaved (pairs of rotary dims adjacent) where HF keeps
    the "rotate half" layout. For one head of hd rows and any trailing dims:

        HF  rows: [x0 x1 .. x(hd/2-1) | y0 y1 .. y(hd/2-1)]   reshape (2, hd/2) ─┐
        GGUF rows: [x0 y0 x1 y1 ...]                          = swapaxes -> (hd/2, 2)

    so the inverse reads GGUF rows as (n_heads, hd/2, 2, ...) and swaps back to (n_heads, 2, hd/2, ...).
    """
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _memlm_name(gguf_name: str) -> str | None:
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        target = _BLOCK_NAMES.get(part)
        return None if target is None else f"layers.{layer}.{target}.{kind}"
    stem, _, kind = gguf_name.rpartition(".")
    target = _TOP_NAMES.get(stem)
    return None if target is None else f"{target}.{kind}"


def _same_data(f: GGUFFile, a: TensorInfo | None, b: TensorInfo | None) -> bool:
    if a is None or b is None or a.ggml_type != b.ggml_type or a.shape != b.shape:
        return False
    return bool(np.array_equal(f.raw(a), f.raw(b)))


def _dequantize(f: GGUFFile, tensor: TensorInfo) -> np.ndarray:
    """One GGUF tensor as fp32 numpy in torch layout (out, in)."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if tensor.ggml_type in (T.I8, T.I16, T.I32, T.I64):
        raise UnsupportedModelError(f"{f.path}: tensor {tensor.name} has integer type "
                                    f"{tensor.ggml_type.name}, which is not a weight format memlm can load")
    data = f.raw(tensor)
    try:
        if tensor.ggml_type == T.F64:
            return data.astype(np.float32)
        return quants.dequantize(data, tensor.ggml_type).reshape(tensor.shape)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"{f.path}: tensor {tensor.name} uses GGML type "
                                    f"{tensor.ggml_type.name}, which memlm cannot dequantize; supported types: "
                                    f"{', '.join(SUPPORTED_TYPES)}") from e


def _load_tensor(sink: WeightSink, cfg: ModelConfig, f: GGUFFile, tensor: TensorInfo, permute: bool) -> None:
    """Dequantize one GGUF tensor, fix its layout, and copy it into the model."""
    name = tensor.name
    if name == "rope_freqs.weight":    # llama 3.x: per-frequency divisors of the RoPE angle
        factors = torch.from_numpy(_dequantize(f, tensor).copy()).double()
        sink.model.rotary.inv_freq = sink.model.rotary.inv_freq / factors
        return
    target = _memlm_name(name)
    if target is None:
        raise UnsupportedModelError(f"{f.path}: unexpected tensor {name!r} for a {cfg.arch} model; "
                                    "this variant is not supported")
    if target == "lm_head.weight" and cfg.tie_word_embeddings:
        return
    fused_qkv = target.endswith(("attn.qkv.weight", "attn.qkv.bias"))  # gpt2: (3H, ...) rows q|k|v
    targets = [target.replace("qkv", f"{p}_proj") for p in "qkv"] if fused_qkv else [target]
    codec = tensor.ggml_type.name.lower()
    kernels = kquant.kernels_for(codec)
    keep = kernels is not None and all(sink.keeps_blocks(t, codec) for t in targets)
    w = f.raw(tensor) if keep else _dequantize(f, tensor)   # (out, row bytes) uint8 | (out, in) fp32
    for t, chunk in zip(targets, np.split(w, 3, axis=0) if fused_qkv else [w]):
        if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
            chunk = unpermute_qk(chunk, cfg.num_heads)        # rows move whole: blocks too
        elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
            chunk = unpermute_qk(chunk, cfg.num_kv_heads)
        if keep:
            sink.put_blocks(t, kernels.from_gguf_bytes(chunk, codec, chunk.shape[0], tensor.shape[1]))
        else:
            sink.put(t, torch.from_numpy(chunk))


def load_gguf(path, device="cpu", dtype=torch.float32, method=None) -> LoadedModel:
    """Load a GGUF file into a memlm `Transformer` (weights dequantized to `dtype`; with a linear
    `method`, each part converted to it as soon as it is read, see `WeightSink`).

    Raises:
        ModelLoadError: missing, non-GGUF, truncated or inconsistent file.
        UnsupportedModelError: architecture or tensor type memlm does not support.
    """
    f = open_gguf(path)
    meta, by_name = f.metadata, f.tensors
    names = set(by_name)
    if _same_data(f, by_name.get("output.weight"), by_name.get("token_embd.weight")):
        names.discard("output.weight")     # gpt2 GGUFs store the tied head twice
    try:
        cfg = config_from_metadata(meta, names, f.path)
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    except MemlmError:
        raise
    except Exception as e:  # ModelConfig's ValueError, tokenizers' Exception on bad merges, ...
        raise ModelLoadError(f"{f.path}: GGUF metadata describes an invalid model or tokenizer "
                             f"({type(e).__name__}: {e}); re-convert it with a current llama.cpp") from e
    sink = WeightSink(cfg, device=device, dtype=dtype, source=str(f.path), method=method)
    permute = cfg.arch == "llama"
    with warnings.catch_warnings():    # F32 tensors are read-only views of the mapped file
        warnings.simplefilter("ignore", UserWarning)
        for tensor in by_name.values():
            _load_tensor(sink, cfg, f, tensor, permute)
            f.drop_pages(tensor)
    model = sink.finish()
    return LoadedModel(config=cfg, model=model, tokenizer=tokenizer, source=str(f.path), format="gguf",
                       weight_bytes=model.weight_bytes())
