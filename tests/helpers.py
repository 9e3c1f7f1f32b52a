"""Test support for the loader tests (and engine tests that want real checkpoints): tiny random
transformers models saved as safetensors with a byte-level BPE tokenizer trained on the fly,
a tiny GGUF writer, and greedy decoding references.

Not a test module (no `test_` prefix).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, héllo wörld — 日本語 🙂",
          "memlm runs language models inside a memory budget.", "1234 5678 numbers and words"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 320
PROMPTS = ["The quick brown fox", "Hello world", "memlm runs 1234", "<|im_start|>user\nhi<|im_end|>\n"]


def train_tokenizer(out_dir: Path, vocab_size: int = VOCAB):
    """A byte-level BPE (GPT-2 style) trained on CORPUS, saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE}))
    return tk


def _save(model, out_dir: Path) -> Path:
    with torch.no_grad():   # HF inits biases to 0 and norms to 1; perturb them so they count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif p.dim() == 1:
                p.normal_(1, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    train_tokenizer(out_dir)
    return out_dir


def make_tiny_hf_llama(tmpdir, seed: int = 0, tie: bool = False, family: str = "llama") -> Path:
    """A random 2-layer Llama with GQA (4 heads / 2 kv heads) saved to `tmpdir`; returns the dir.

    `family` "qwen2" (q/k/v biases) or "mistral" builds that Llama variant instead.
    """
    import transformers

    prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{prefix}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return _save(getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval(), Path(tmpdir))


def make_tiny_hf_gpt2(tmpdir, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 (n_embd 64, 4 heads, tied embeddings) saved to `tmpdir`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                     initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return _save(GPT2LMHeadModel(cfg).eval(), Path(tmpdir))


@torch.no_grad()
def greedy_reference(model, prompt_ids, n: int) -> list[int]:
    """n greedy tokens from a transformers causal LM, recomputing the full sequence each step."""
    ids = list(prompt_ids)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


@torch.no_grad()
def greedy_memlm(model, prompt_ids, n: int, stop=()) -> list[int]:
    """n greedy tokens from a memlm Transformer through the reference ContiguousCache."""
    from memlm.models.kv import ContiguousCache

    cfg = model.cfg
    cache = ContiguousCache(cfg.num_kv_heads, cfg.head_dim, cfg.depth, len(prompt_ids) + n)
    out, step = [], list(prompt_ids)
    for _ in range(n):
        cache.begin_step(len(step))
        h = model(torch.tensor(step), torch.arange(cache.length, cache.length + len(step)), cache)
        cache.end_step()
        token = int(model.compute_logits(h[-1:]).argmax())
        out.append(token)
        if token in stop:
            break
        step = [token]
    return out


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (HF rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, hf_dir: Path, types: dict | None = None, arch: str = "llama",
                          tokenizer_pre: str = "gpt2") -> dict[str, torch.Tensor]:
    """Write the Llama in `hf_dir` as a GGUF (llama.cpp names, q/k permuted, tokenizer metadata).

    Args:
        types: GGUF tensor name suffix (e.g. "attn_q.weight") -> GGMLQuantizationType; others F32.
    Returns:
        HF state dict with each weight replaced by its dequantized value (the exact reference).
    """
    import gguf
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"]); w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"]); w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh); w.add_head_count_kv(nkv); w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0); w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre(tokenizer_pre)
    w.add_token_list(tokens); w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(vocab["<|im_start|>"]); w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    reference = {}
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{per_layer[stem]}.{kind}"
        else:
            gname = names[name]
        arr = t.float().numpy()
        qtype = (types or {}).get(gname.split(".", 2)[-1] if gname.startswith("blk.") else gname,
                                 gguf.GGMLQuantizationType.F32)
        permute = arch == "llama" and arr.ndim == 2     # llama.cpp permutes llama q/k only
        if permute and "attn_q" in gname:
            arr = llama_permute(arr, nh)
        elif permute and "attn_k" in gname:
            arr = llama_permute(arr, nkv)
        data = quantize(arr, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype if qtype not in (0, 1) else None)
        back = dequantize(data, qtype).reshape(arr.shape)
        if permute and "attn_q" in gname:
            back = llama_permute_inverse(back, nh)
        elif permute and "attn_k" in gname:
            back = llama_permute_inverse(back, nkv)
        reference[name] = torch.from_numpy(np.ascontiguousarray(back))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return reference


def llama_permute_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `llama_permute`, found by applying it to an index vector (independent of memlm)."""
    idx = llama_permute(np.arange(w.shape[0]), n_head)
    out = np.empty_like(w)
    out[idx] = w
    return out


def budget_above_rss(extra_mib: int = 768) -> str:
    """A --memory-budget `extra_mib` above this process's RSS now: in-process tests run after the
    whole suite's imports (ray, flwr, transformers ...), so a fixed budget can fall below the
    runtime baseline the engine measures."""
    import psutil

    return f"{psutil.Process().memory_info().rss // 2**20 + extra_mib}MiB"


def tiny_teacher_world(d: Path, text: str) -> Path:
    """`d` with corpus.txt (`text`) and teacher/ (a tiny random memlm model with a tokenizer
    trained on `text`): what the train/distill command-line tests run on."""
    from memlm.config import ModelConfig
    from memlm.models import Transformer
    from memlm.training import checkpoint
    from memlm.training.data import TextTokenizer

    (d / "corpus.txt").write_text(text)
    tok = TextTokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                                      intermediate_size=64, eos_token_ids=tok.eos_token_ids))
    checkpoint.save_model(teacher, d / "teacher", tok)
    return d


def random_rope(rows: int, head_dim: int):
    """(cos, sin) tables of random angles, (rows, head_dim) each, in the rotate-half layout."""
    ang = torch.rand(rows, head_dim // 2) * 6
    return torch.cat([ang.cos()] * 2, 1).contiguous(), torch.cat([ang.sin()] * 2, 1).contiguous()


def whole_layer_decodes(llm, monkeypatch, n_prompts: int = 4, max_tokens: int = 6):
    """Greedy tokens of `n_prompts` short prompts through `llm`, first with decode steps free to
    take the whole-layer native calls (`block_layer.decode_layers`), then with the cache refusing
    them (`PagedView.direct_decode` -> None): (tokens, tokens without, steps that took them)."""
    from memlm import SamplingParams
    from memlm.kernels import block_layer
    from memlm.kv import paged_view
    taken = []
    real = block_layer.decode_layers
    monkeypatch.setattr(block_layer, "decode_layers", lambda *a: taken.append(real(*a)) or taken[-1])
    prompts = [{"prompt_token_ids": [5 + i, 6, 7 + 2 * i, 9]} for i in range(n_prompts)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    whole = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    n = sum(t is not None for t in taken)
    monkeypatch.setattr(paged_view.PagedView, "direct_decode", lambda self, depth: None)
    apart = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert sum(t is not None for t in taken) == n                    # none taken the second time
    return whole, apart, n
