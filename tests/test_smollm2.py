"""The embedded SmolLM2-135M-Instruct GGUF (Q8_0 embeddings, Q4_1 layers) loads, tokenizes like
transformers' GGUF tokenizer, answers a chat question, and decodes greedily like transformers."""
from pathlib import Path

import pytest
import torch

from helpers import budget_above_rss, greedy_memlm, greedy_reference
from memlm.loading import DEFAULT_MODEL, IncrementalDetokenizer, load_model
from memlm.models.registry import resolve_preset

pytestmark = pytest.mark.slow
TEXTS = ["Hello world!", "héllo wörld — 日本語 🙂", "The year 2024 had 365 days.",
         "  spaces\n\nnewlines\tand tabs", "<|im_start|>user\nhi<|im_end|>\n"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = resolve_preset(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_loads_with_expected_shape(smol):
    cfg = smol.config
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert smol.format == "gguf" and smol.weight_bytes == smol.model.num_parameters() * 4
    assert resolve_preset("smollm2") == resolve_preset(DEFAULT_MODEL) == Path(smol.source)


def test_tokenizer_roundtrip_and_matches_transformers(smol, hf_tokenizer):
    tok = smol.tokenizer
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, (2,), 49152)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
    assert tok.encode("<|im_start|>")[0] == 1                # control tokens are never split
    assert tok.apply_chat_template(QUESTION) == hf_tokenizer.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True)


def test_incremental_detokenizer_never_splits_characters(smol):
    tok = smol.tokenizer
    text = "héllo wörld — 日本語 🙂!"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())                      # multi-byte chars span tokens
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Say: "))
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == detok.text == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[7:10] == ["", "", " 日"] and pieces[11:14] == ["", "", "語"]   # held back, then whole


def test_chat_answer_matches_transformers(smol):
    from transformers import AutoModelForCausalLM

    path = resolve_preset(DEFAULT_MODEL)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = smol.tokenizer.encode(smol.tokenizer.apply_chat_template(QUESTION))
    answer = greedy_memlm(smol.model, ids, 20, stop=smol.tokenizer.eos_token_ids)
    assert "Paris" in smol.tokenizer.decode(answer)
    assert greedy_memlm(smol.model, ids, 16) == greedy_reference(ref, ids, 16)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
        got = smol.model.compute_logits(smol.model.forward_dense(torch.tensor([ids]))[0])
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("gemm, amx", [("auto", "auto"), ("1", "0"), ("auto", "1")])
def test_default_engine_answers_the_quickstart_question(gemm, amx, monkeypatch):
    """The README's Quickstart through the default engine (the file's own blocks, the native
    kernels: on CPUs with AMX the AMX GEMM from 16 rows), with the blocked 8-bit GEMM forced on
    the prompt's prefill as on a long prompt's chunks (one activation plane there flips this
    answer, `gemv.int8_gemm`; the default's second plane for outlier blocks keeps it), and with
    the AMX GEMM at every row count where the CPU has it."""
    from memlm import LLM, SamplingParams

    monkeypatch.setenv("MEMLM_INT8_GEMM", gemm)
    monkeypatch.setenv("MEMLM_AMX", amx)
    monkeypatch.delenv("MEMLM_GEMM_PLANES", raising=False)
    llm = LLM(DEFAULT_MODEL, memory_budget=budget_above_rss(), max_num_seqs=1, verbose=False)
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=12))
    out = out[0] if isinstance(out, list) else out
    assert "Paris" in out.outputs[0].text
