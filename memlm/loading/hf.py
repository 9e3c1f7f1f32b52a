"""Hugging Face and memlm checkpoint directories -> `LoadedModel`.

Owns: `config.json` -> `ModelConfig` for GPT-2, Llama, Qwen2 and Mistral; HF tensor names ->
memlm names (GPT-2's Conv1D (in, out) weights transposed, its fused c_attn split into q/k/v);
memlm's own checkpoints (`memlm_config.json` + `model.safetensors` in memlm names); refusing
pickle checkpoints. Tensors are read one at a time with `safetensors.safe_open`.
Does not know: tokenizer internals (`tokenizer.py`) or GGUF. Never unpickles anything.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from memlm.config import ModelConfig
from memlm.errors import ModelLoadError, UnsupportedModelError
from memlm.loading.base import LoadedModel, WeightSink
from memlm.loading.tokenizer import Tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_HOW_TO_CONVERT = ("convert it to safetensors first: load it in transformers and call "
                   "model.save_pretrained(dir, safe_serialization=True)")


def refuse_pickle(path: Path) -> None:
    raise ModelLoadError(f"{path} is a pickle checkpoint, which memlm never loads (unpickling can run "
                         f"arbitrary code); {_HOW_TO_CONVERT}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}; fix or re-save the file") from e


def config_from_hf(hf: dict, path: Path) -> ModelConfig:
    """Translate a transformers `config.json` dict into a ModelConfig."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: architecture {arch!r} is not supported; memlm loads "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    eos = hf.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if arch == "GPT2LMHeadModel":
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu"}.get(hf.get("activation_function", "gelu_new"))
        if act is None or hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise UnsupportedModelError(f"{path}: this GPT-2 variant (activation "
                                        f"{hf.get('activation_function')!r} / attention scaling) is not supported")
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
            num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
            max_position_embeddings=hf.get("n_positions", 1024), arch="gpt2", norm="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", activation=act, position="learned",
            qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UnsupportedModelError(f"{path}: RoPE scaling {rope.get('rope_type')!r} is not supported; "
                                    "use a model without rope scaling")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{path}: activation {hf.get('hidden_act')!r} is not supported for {arch}")
    max_pos = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "MistralForCausalLM") else None
    if window:   # within the window, sliding-window attention is plain causal attention
        max_pos = min(max_pos, window)
    qwen = arch == "Qwen2ForCausalLM"
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        max_position_embeddings=max_pos, arch={"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                                "MistralForCausalLM": "mistral"}[arch],
        norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", activation="silu", position="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        qkv_bias=qwen or bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos)


# HF name (after stripping "model." / "transformer.") -> memlm name; {i} is the layer index.
_LLAMA_NAMES = {
    r"embed_tokens\.weight": "embed.weight", r"norm\.weight": "final_norm.weight",
    r"lm_head\.weight": "lm_head.weight",
    r"layers\.(\d+)\.input_layernorm\.weight": r"layers.\1.attn_norm.weight",
    r"layers\.(\d+)\.post_attention_layernorm\.weight": r"layers.\1.mlp_norm.weight",
    r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)": r"layers.\1.attn.\2_proj.\3",
    r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)": r"layers.\1.mlp.\2_proj.\3",
}
_GPT2_NAMES = {
    r"wte\.weight": "embed.weight", r"wpe\.weight": "pos_embed.weight", r"lm_head\.weight": "lm_head.weight",
    r"ln_f\.(weight|bias)": r"final_norm.\1",
    r"h\.(\d+)\.ln_1\.(weight|bias)": r"layers.\1.attn_norm.\2",
    r"h\.(\d+)\.ln_2\.(weight|bias)": r"layers.\1.mlp_norm.\2",
    r"h\.(\d+)\.attn\.c_attn\.(weight|bias)": r"layers.\1.attn.qkv.\2",
    r"h\.(\d+)\.attn\.c_proj\.(weight|bias)": r"layers.\1.attn.o_proj.\2",
    r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)": r"layers.\1.mlp.up_proj.\2",
    r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)": r"layers.\1.mlp.down_proj.\2",
}
_GPT2_IGNORED = re.compile(r"h\.\d+\.attn\.(masked_)?bias$")   # causal-mask buffers in old checkpoints


def _map_name(name: str, table: dict) -> str | None:
    name = re.sub(r"^(model|transformer)\.", "", name)
    for pattern, target in table.items():
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(target)
    return None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shard {missing[0]} named in model.safetensors.index.json is "
                                 "missing; download all shards")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            refuse_pickle(next(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES))
        raise ModelLoadError(f"{path} has no *.safetensors weights: save the model with "
                             "save_pretrained(dir, safe_serialization=True)")
    return files


def _iter_tensors(files: list[Path]):
    """Yield (name, tensor) one at a time from safetensors files."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except Exception as e:  # SafetensorError, OSError, RuntimeError from a corrupt file
            raise ModelLoadError(f"{f} is not a readable safetensors file ({e}); download or save it again") from e


def _fill(sink: WeightSink, cfg: ModelConfig, files: list[Path], table: dict | None) -> None:
    """Copy every tensor of `files` into the sink, renaming with `table` (None: memlm names)."""
    for name, t in _iter_tensors(files):
        if table is None:
            target = name
        else:
            target = _map_name(name, table)
            if target is None:
                if table is _GPT2_NAMES and _GPT2_IGNORED.search(name):
                    continue
                raise UnsupportedModelError(f"{sink.source}: unexpected tensor {name!r}; this {cfg.arch} "
                                            "variant is not supported")
        if target == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if table is _GPT2_NAMES and t.dim() == 2 and (".attn." in target or ".mlp." in target):
            t = t.t()                                   # Conv1D (in, out) -> Linear (out, in)
        if ".attn.qkv." in target:                      # fused (3H, ...) rows q|k|v
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                sink.put(target.replace("qkv", f"{part}_proj"), chunk)
        else:
            sink.put(target, t)


def load_hf_dir(path, device="cpu", dtype=torch.float32, method=None) -> LoadedModel:
    """Load a Hugging Face (config.json + safetensors) or memlm (memlm_config.json) directory
    (with a linear `method`, each part converted to it as soon as it is read, see `WeightSink`).

    Raises:
        ModelLoadError: missing files, pickle checkpoints, corrupt safetensors.
        UnsupportedModelError: an architecture memlm does not implement.
    """
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} does not exist or is not a directory: pass a model directory, "
                             "a .gguf file or a known model name")
    if (path / "memlm_config.json").is_file():
        try:
            cfg = ModelConfig.from_dict(_read_json(path / "memlm_config.json"))
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}/memlm_config.json is invalid ({e}); re-save the checkpoint") from e
        fmt, table = "memlm", None
    elif (path / "config.json").is_file():
        try:
            cfg = config_from_hf(_read_json(path / "config.json"), path)
        except KeyError as e:
            raise ModelLoadError(f"{path}/config.json lacks {e}; re-save the model with transformers") from e
        except (TypeError, ValueError) as e:
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"{path}/config.json describes an invalid model ({e})") from e
        fmt, table = "hf", (_GPT2_NAMES if cfg.arch == "gpt2" else _LLAMA_NAMES)
    else:
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            refuse_pickle(next(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES))
        raise ModelLoadError(f"{path} has neither config.json nor memlm_config.json: it is not a model directory")
    files = _safetensors_files(path)
    tokenizer = Tokenizer.from_hf_dir(path)
    sink = WeightSink(cfg, device=device, dtype=dtype, source=str(path), method=method)
    _fill(sink, cfg, files, table)
    model = sink.finish()
    return LoadedModel(config=cfg, model=model, tokenizer=tokenizer, source=str(path), format=fmt,
                       weight_bytes=model.weight_bytes())
