"""Test support for the engine tests: a byte-level fake tokenizer and tiny random models.

Not a test module (no `test_` prefix); imported by tests/test_engine_*.py, test_entrypoints_*.py, ...
"""
from __future__ import annotations

import pytest
import torch

from memlm.config import ModelConfig
from memlm.loading.base import LoadedModel
from memlm.models.transformer import Transformer

EOS, BOS = 256, 257


class ByteTokenizer:
    """ids 0..255 are bytes; 256 = <eos>, 257 = <bos>. Multi-byte UTF-8 spans several ids."""

    eos_token_ids = (EOS,)
    bos_token_id = BOS
    vocab_size = 260

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def llama_config(**kw) -> ModelConfig:
    base = dict(vocab_size=260, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=False,
                intermediate_size=128, max_position_embeddings=1024, arch="llama")
    base.update(kw)
    return ModelConfig(**base)


def gpt2_config(**kw) -> ModelConfig:
    base = dict(vocab_size=260, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, tie_word_embeddings=False,
                max_position_embeddings=512, arch="gpt2", norm="layer", mlp="gelu",
                activation="gelu_tanh", position="learned", qkv_bias=True, o_bias=True,
                mlp_bias=True)
    base.update(kw)
    return ModelConfig(**base)


def tiny_loaded(cfg: ModelConfig, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval().requires_grad_(False)
    return LoadedModel(config=cfg, model=model, tokenizer=ByteTokenizer(), source="random",
                       format="memlm", weight_bytes=model.weight_bytes())


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 256) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append({"prompt_token_ids": torch.randint(0, vocab, (L,), generator=g).tolist()})
    return out


def linear_holding(w: torch.Tensor, b: torch.Tensor | None, method):
    """An fp32 `Linear` holding w (out, in) and b, then processed by `method` (as after loading)."""
    from memlm.models.linear import Linear, get_linear_method
    layer = Linear(w.shape[1], w.shape[0], b is not None, get_linear_method("fp32"))
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    layer.process(method)
    return layer


def scheduler_request(i: int, prompt: list[int], max_tokens: int = 4):
    """Request `i` (arrival i, sequence ids from 100 * i) for scheduler tests: greedy, ignore_eos."""
    import itertools

    from memlm import SamplingParams
    from memlm.engine.request import Request
    r = Request(str(i), None, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                ByteTokenizer(), arrival=i)
    r.assign_seq_ids(itertools.count(100 * i))
    return r


def scheduler_step(sched, token: int = 65):
    """One schedule() + update() in which every sampling sequence samples `token`."""
    out = sched.schedule()
    sched.update(out, {s.seq.seq_id: (token, None) for s in out.scheduled if s.samples})
    return out
