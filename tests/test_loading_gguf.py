"""A tiny random Llama written as GGUF (llama.cpp names, q/k permuted, mixed F32/F16/Q8_0/Q4_0/
Q4_1 tensors, tokenizer metadata) loads in memlm and matches transformers run on the same
dequantized weights; the GGUF tokenizer equals the original one."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from helpers import (PROMPTS, greedy_memlm, greedy_reference, llama_permute, llama_permute_inverse,
                     make_tiny_hf_llama, write_tiny_llama_gguf)  # noqa: F401
from memlm.loading import load_gguf, load_model
from memlm.loading.gguf import unpermute_qk
from memlm.loading.tokenizer import Tokenizer

MIXED = {"token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "attn_q.weight": Q.Q8_0,
         "attn_k.weight": Q.F16, "attn_output.weight": Q.Q4_0, "ffn_gate.weight": Q.Q4_1,
         "ffn_up.weight": Q.Q8_0, "ffn_down.weight": Q.BF16}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("llama"))


def _reference_model(hf_dir, state):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ref.load_state_dict(state, strict=False)
    return ref


@pytest.mark.parametrize("types", [{}, MIXED], ids=["f32", "mixed-quant"])
def test_gguf_matches_transformers(hf_dir, tmp_path, types):
    path = tmp_path / "tiny.gguf"
    state = write_tiny_llama_gguf(path, hf_dir, types)
    ref = _reference_model(hf_dir, state)
    lm = load_model(str(path))
    assert lm.format == "gguf" and lm.config.num_kv_heads == 2 and not lm.config.tie_word_embeddings
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = lm.tokenizer.encode(prompt)
            want = ref(torch.tensor([ids])).logits[0]
            got = lm.model.compute_logits(lm.model.forward_dense(torch.tensor([ids]))[0])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ids = lm.tokenizer.encode(PROMPTS[0])
    assert greedy_memlm(lm.model, ids, 32) == greedy_reference(ref, ids, 32)


def test_gguf_tokenizer_matches_source(hf_dir, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, hf_dir)
    lm = load_gguf(path)
    src = Tokenizer.from_hf_dir(hf_dir)
    for text in PROMPTS + ["héllo wörld — 日本語 🙂", "  two  spaces\n\nand 12345"]:
        assert lm.tokenizer.encode(text) == src.encode(text)
        assert lm.tokenizer.decode(lm.tokenizer.encode(text), skip_special_tokens=False) == text
    assert lm.tokenizer.eos_token_ids == src.eos_token_ids
    assert lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        src.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tied_embeddings_when_output_absent(tmp_path):
    d = make_tiny_hf_llama(tmp_path / "tied", tie=True)
    path = tmp_path / "tied.gguf"
    state = write_tiny_llama_gguf(path, d)
    lm = load_gguf(path)
    assert lm.config.tie_word_embeddings and not hasattr(lm.model, "lm_head")
    ref = _reference_model(d, state)
    ids = torch.tensor([lm.tokenizer.encode(PROMPTS[1])])
    with torch.no_grad():
        torch.testing.assert_close(lm.model.compute_logits(lm.model.forward_dense(ids)[0]),
                                   ref(ids).logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_head", [1, 3, 4])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(llama_permute_inverse(llama_permute(w, n_head), n_head), w)
    b = np.arange(n_head * 8, dtype=np.float32)     # 1-D (bias) rows permute the same way
    np.testing.assert_array_equal(unpermute_qk(llama_permute(b, n_head), n_head), b)


def _write_gpt2_gguf(path, hf_dir):
    """The GPT-2 in `hf_dir` as llama.cpp writes it: Conv1D weights transposed to (out, in),
    fused attn_qkv kept fused, and the tied head stored a second time as output.weight."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(cfg["n_layer"]); w.add_context_length(cfg["n_positions"])
    w.add_embedding_length(cfg["n_embd"]); w.add_feed_forward_length(4 * cfg["n_embd"])
    w.add_head_count(cfg["n_head"]); w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("gpt2")
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    names = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        name = name.removeprefix("transformer.")
        arr = t.numpy()
        if name.startswith("h."):
            _, i, rest = name.split(".", 2)
            stem, kind = rest.rsplit(".", 1)
            if kind == "weight" and stem.startswith(("attn.", "mlp.")):
                arr = arr.T.copy()
            w.add_tensor(f"blk.{i}.{names[stem]}.{kind}", arr)
        else:
            gname = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
                     "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}[name]
            w.add_tensor(gname, arr)
            if gname == "token_embd.weight":
                w.add_tensor("output.weight", arr)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def test_gpt2_gguf_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers import make_tiny_hf_gpt2

    d = make_tiny_hf_gpt2(tmp_path / "gpt2")
    _write_gpt2_gguf(tmp_path / "gpt2.gguf", d)
    lm = load_gguf(tmp_path / "gpt2.gguf")
    assert lm.config.arch == "gpt2" and lm.config.tie_word_embeddings   # duplicate head detected
    ref = AutoModelForCausalLM.from_pretrained(d).eval()
    ids = lm.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(lm.model.compute_logits(lm.model.forward_dense(torch.tensor([ids]))[0]),
                                   ref(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)
    assert greedy_memlm(lm.model, ids, 32) == greedy_reference(ref, ids, 32)


def test_load_in_bfloat16(hf_dir, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, hf_dir)
    full, half = load_gguf(path), load_gguf(path, dtype=torch.bfloat16)
    assert half.weight_bytes * 2 == full.weight_bytes
    for (n1, p1), (n2, p2) in zip(full.model.named_parameters(), half.model.named_parameters()):
        assert n1 == n2 and p2.dtype == torch.bfloat16 and torch.equal(p1.to(torch.bfloat16), p2)


def test_qwen2_gguf_with_qkv_bias(tmp_path):
    d = make_tiny_hf_llama(tmp_path / "qwen2", family="qwen2")
    path = tmp_path / "qwen2.gguf"
    state = write_tiny_llama_gguf(path, d, arch="qwen2")
    lm = load_gguf(path)
    assert lm.config.arch == "qwen2" and lm.config.qkv_bias and not lm.config.o_bias
    ref = _reference_model(d, state)
    ids = lm.tokenizer.encode(PROMPTS[2])
    with torch.no_grad():
        torch.testing.assert_close(lm.model.compute_logits(lm.model.forward_dense(torch.tensor([ids]))[0]),
                                   ref(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)
