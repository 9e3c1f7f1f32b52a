"""HF safetensors directories (GPT-2, Llama with GQA) and memlm checkpoints load into memlm and
match transformers: logits within 1e-4, identical 32-token greedy continuations."""
import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import PROMPTS, greedy_memlm, greedy_reference, make_tiny_hf_gpt2, make_tiny_hf_llama
from memlm.loading import load_hf_dir, load_model

BUILDERS = {"llama": make_tiny_hf_llama, "gpt2": make_tiny_hf_gpt2,
            "qwen2": lambda d: make_tiny_hf_llama(d, family="qwen2"),
            "mistral": lambda d: make_tiny_hf_llama(d, family="mistral")}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    d = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    ref = AutoModelForCausalLM.from_pretrained(d).eval()
    return request.param, d, ref, load_model(str(d))


def test_config_and_metadata(pair):
    arch, d, ref, lm = pair
    assert lm.format == "hf" and lm.config.arch == arch
    assert lm.config.num_layers == 2 and lm.config.hidden_size == 64
    assert lm.weight_bytes == sum(p.numel() * 4 for p in lm.model.parameters())
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    if arch != "gpt2":
        assert lm.config.num_kv_heads == 2 and not lm.config.tie_word_embeddings
        assert lm.config.qkv_bias == (arch == "qwen2")
    else:
        assert lm.config.position == "learned" and lm.config.tie_word_embeddings


@torch.no_grad()
def test_logits_match_transformers(pair):
    arch, d, ref, lm = pair
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        want = ref(torch.tensor([ids])).logits[0]
        got = lm.model.compute_logits(lm.model.forward_dense(torch.tensor([ids]))[0])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_greedy_matches_transformers(pair):
    arch, d, ref, lm = pair
    for prompt in PROMPTS[:3]:
        ids = lm.tokenizer.encode(prompt)
        assert greedy_memlm(lm.model, ids, 32) == greedy_reference(ref, ids, 32)


def test_tokenizer_matches_transformers(pair):
    from transformers import AutoTokenizer

    arch, d, ref, lm = pair
    if arch == "qwen2":
        pytest.skip("transformers swaps in Qwen2Tokenizer's own split regex, ignoring tokenizer.json")
    hf_tok = AutoTokenizer.from_pretrained(d)
    for prompt in PROMPTS + ["héllo wörld — 日本語 🙂"]:
        ids = lm.tokenizer.encode(prompt)
        assert ids == hf_tok.encode(prompt, add_special_tokens=False)
        assert lm.tokenizer.decode(ids, skip_special_tokens=False) == prompt
    assert lm.tokenizer.eos_token_ids == (lm.tokenizer.token_to_id("<|im_end|>"),)
    chat = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)


def test_memlm_checkpoint_roundtrip(pair, tmp_path):
    arch, d, ref, lm = pair
    state = {k: v.clone() for k, v in lm.model.state_dict().items()
             if not (k == "lm_head.weight" and lm.config.tie_word_embeddings)}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "memlm_config.json").write_text(json.dumps(lm.config.to_dict()))
    (tmp_path / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    again = load_hf_dir(tmp_path)
    assert again.format == "memlm" and again.config == lm.config
    ids = torch.tensor([lm.tokenizer.encode(PROMPTS[0])])
    torch.testing.assert_close(again.model.forward_dense(ids), lm.model.forward_dense(ids), atol=0, rtol=0)


def test_sharded_checkpoint(tmp_path):
    from safetensors.torch import load_file

    d = make_tiny_hf_llama(tmp_path / "one", seed=1)
    full = load_model(str(d))
    state = load_file(str(d / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    out = tmp_path / "sharded"
    out.mkdir()
    for f, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out / f))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((d / f).read_bytes())
    sharded = load_model(str(out))
    for (n1, p1), (n2, p2) in zip(full.model.named_parameters(), sharded.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_load_model_with_bf16_weights(tmp_path):
    """`weight_dtype` picks the linear method: fp32 as read, then converted layer by layer."""
    d = make_tiny_hf_llama(tmp_path, seed=2)
    with pytest.raises(ValueError, match="weight dtype must be one of fp32, bf16"):
        load_model(str(d), weight_dtype="fp16")
    full, half = load_model(str(d)), load_model(str(d), weight_dtype="bfloat16")
    assert full.model.linear_method.name == "fp32" and half.model.linear_method.name == "bf16"
    assert half.weight_bytes == half.model.weight_bytes() and 0.45 < half.weight_bytes / full.weight_bytes < 0.55
    assert all(layer.fused for layer in half.model.layers)
    ids = torch.tensor([full.tokenizer.encode(PROMPTS[0])])
    with torch.inference_mode():
        ref = full.model.compute_logits(full.model.forward_dense(ids)[0])
        out = half.model.compute_logits(half.model.forward_dense(ids)[0])
    assert (out - ref).norm() / ref.norm() < 3e-2
