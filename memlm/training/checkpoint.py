"""Checkpoints: the model directory memlm's loader reads, an HF export, and the training state.

Owns: file formats. Does not know: the training loop (it hands over the objects to save).
Never pickles: tensors go to safetensors, everything else to JSON.

    <dir>/memlm_config.json      ModelConfig.to_dict()
    <dir>/model.safetensors      Transformer.state_dict() (memlm names; tied weights stored once)
    <dir>/tokenizer.json (+ tokenizer_config.json)
    <dir>/train_state/tensors.safetensors  optimizer moments "opt.<param#>.<name>", objective
                                 params "objective.<name>", torch RNG "rng.torch"
    <dir>/train_state/state.json step, optimizer param_groups, schedule/controller state, history
The training state sits in a subdirectory so the model dir's own *.safetensors are only weights
(loaders read every *.safetensors at the top), and deleting it leaves a shippable model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memlm import dtypes
from memlm.config import ModelConfig
from memlm.errors import MemlmError

SAVE_DTYPES = ("fp32", "fp16", "bf16")     # floating-point dtypes a model directory can store


def _backend(tokenizer):
    import tokenizers
    for attr in ("_tk", "tok", "backend", "_tokenizer"):
        t = getattr(tokenizer, attr, None)
        if isinstance(t, tokenizers.Tokenizer):
            return t
    return tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else None


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Write tokenizer.json and a tokenizer_config.json naming the special tokens."""
    backend = _backend(tokenizer)
    if backend is None:
        raise MemlmError("cannot save this tokenizer: it has no `tokenizers` backend")
    backend.save(str(directory / "tokenizer.json"))
    cfg = {}
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    if bos is not None:
        cfg["bos_token"] = backend.id_to_token(bos)
    if eos:
        cfg["eos_token"] = backend.id_to_token(eos[0])
    cfg["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    if getattr(tokenizer, "chat_template", None):
        cfg["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def save_model(model, directory: str | Path, tokenizer=None, dtype: str | torch.dtype | None = None) -> Path:
    """Write a model directory `memlm generate --model <dir>` loads.

    dtype: store floating-point weights in this dtype, one of `SAVE_DTYPES` or an alias (e.g.
        "bf16" halves a shipped student); the loader converts to its compute dtype on load. None
        keeps them as they are (training checkpoints stay fp32 so a resume is bit-identical).
    """
    if dtype is not None:
        dtype = dtypes.to_torch(dtypes.parse(dtype, allowed=SAVE_DTYPES, what="checkpoint dtype"))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memlm_config.json").write_text(json.dumps(model.cfg.to_dict(), indent=1))
    tensors = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt", "producer": "memlm"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    return directory


def load_model_dir(directory: str | Path):
    """Read back a directory written by `save_model` -> Transformer (for resume and tests)."""
    from memlm.models import Transformer
    directory = Path(directory)
    cfg = ModelConfig.from_dict(json.loads((directory / "memlm_config.json").read_text()))
    model = Transformer(cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model


def is_llama_shaped(cfg: ModelConfig) -> bool:
    return (all(m == "attention" for m in cfg.mixers) and cfg.layer_order == tuple(range(cfg.num_layers))
            and cfg.norm == "rms" and cfg.mlp == "swiglu" and cfg.position == "rope"
            and cfg.activation == "silu" and not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)
            and not (cfg.depth_norms or cfg.depth_gates))


_HF_NAMES = (("embed.weight", "model.embed_tokens.weight"), ("final_norm.weight", "model.norm.weight"),
             ("lm_head.weight", "lm_head.weight"))
_HF_LAYER = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
             ("attn.", "self_attn."))


def export_hf(model, directory: str | Path, tokenizer=None) -> Path:
    """Write a Llama-shaped model as a Hugging Face directory transformers can load.

    Raises:
        MemlmError: the model is not Llama-shaped (recurrent mixers, sharing, GELU, biases).
    """
    cfg = model.cfg
    if not is_llama_shaped(cfg):
        raise MemlmError("only Llama-shaped students (attention only, no layer sharing, RMSNorm, SwiGLU, "
                         "RoPE, no biases) can be exported for transformers")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        hf = dict(_HF_NAMES).get(name)
        if hf is None:
            rest = name
            for a, b in _HF_LAYER:
                rest = rest.replace(a, b)
            hf = "model." + rest
        tensors[hf] = t.detach().contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
              "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
              "bos_token_id": cfg.bos_token_id,
              "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0]}
    (directory / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    return directory


def save_train_state(directory: str | Path, *, step: int, optimizer, objective=None, schedule=None,
                     extra: dict | None = None) -> None:
    """Everything beyond the weights that resuming bit-identically needs."""
    directory = Path(directory) / "train_state"
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"rng.torch": torch.get_rng_state()}
    sd = optimizer.state_dict()
    for pid, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"opt.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    if objective is not None:
        for name, t in objective.state_dict().items():
            tensors[f"objective.{name}"] = t.detach().contiguous()
    save_file(tensors, str(directory / "tensors.safetensors"))
    meta = {"step": step, "param_groups": sd["param_groups"],
            "schedule": schedule.state_dict() if schedule is not None else {}, "extra": extra or {}}
    (directory / "state.json").write_text(json.dumps(meta, indent=1))


def load_train_state(directory: str | Path, *, optimizer, objective=None, schedule=None) -> dict:
    """Restore what `save_train_state` wrote; returns the JSON part (step, extra, ...)."""
    state_dir = Path(directory) / "train_state"
    if not (state_dir / "state.json").exists():
        raise MemlmError(f"{directory} has no train_state/state.json: it is not a resumable checkpoint")
    meta = json.loads((state_dir / "state.json").read_text())
    tensors = load_file(str(state_dir / "tensors.safetensors"))
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if objective is not None:
        objective.load_state_dict({k[len("objective."):]: v for k, v in tensors.items()
                                   if k.startswith("objective.")})
    if schedule is not None:
        schedule.load_state_dict(meta["schedule"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta
