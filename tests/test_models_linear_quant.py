"""Weight-only quantized linear methods (int8, int4): each codec's round-trip error bound, each
method against dequantize-then-matmul over odd shapes, int8 projections as Q8_0 blocks, the int8
embedding / LM head, the bytes
they hold, a tiny model through LLM close to fp32, and the one-line errors."""
import pytest
import torch
import torch.nn.functional as F

import engine_fakes as ef

from memlm.kernels import quant
from engine_fakes import linear_holding
from memlm.models.linear import Embedding, get_linear_method, set_weight_dtype
from memlm.models.linear.int4 import Int4Method
from memlm.models.linear.int8 import Int8Method

BF16 = torch.bfloat16



def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows of different scales and offsets, as real projections have."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1
            + 0.01 * torch.randn(n, 1, generator=g))


@pytest.mark.parametrize("n, k, chunk", [(7, 33, 1024), (50, 64, 16), (300, 576, 64), (3, 1000, 1)])
def test_int8_projections_are_llama_cpp_q8_0_blocks(n, k, chunk):
    """Float projections quantized on load become Q8_0 blocks, byte for byte what gguf writes
    (K padded to whole blocks, any chunking), held for the native block kernels."""
    from memlm.kernels import gemv
    w = _weights(n, k, seed=n + k)
    held = gemv.quantize_q8_0(w, chunk_rows=chunk)
    assert torch.equal(held.blocks, gemv.quantize(w, "q8_0").blocks)
    assert held.codec == "q8_0" and (held.out_features, held.in_features) == (n, k)
    layer = linear_holding(w, None, Int8Method())
    assert layer.weight is None and layer.block_weight.codec == "q8_0"
    assert torch.equal(layer.block_weight.blocks, held.blocks)


@pytest.mark.parametrize("n, k", [(7, 33), (50, 64), (300, 576)])
def test_int8_round_trip_is_within_half_a_step(n, k):
    w = _weights(n, k)
    q = quant.quantize_int8(w, BF16)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (n, -(-k // 16) * 16) and q.scales.dtype == BF16
    err = (quant.dequantize_int8(q.qweight, q.scales, k) - w).abs()                # (n, k)
    step = q.scales.float()[:, None]
    assert bool((err <= 0.5 * step * (1 + 2 ** -7)).all())
    assert int(q.qweight.abs().max()) <= 127


@pytest.mark.parametrize("n, k, group", [(7, 40, 32), (50, 96, 32), (16, 576, 128), (33, 128, 64)])
def test_int4_round_trip_is_within_half_a_step(n, k, group):
    w = _weights(n, k)
    codes, sz = quant.quantize_int4_codes(w, group, BF16)
    np_, kp = codes.shape
    assert np_ % 16 == 0 and kp % group == 0 and int(codes.min()) >= 0 and int(codes.max()) <= 15
    deq = quant.dequantize_int4_codes(codes, sz, group, k, n)                          # (n, k)
    step = sz[..., 0].float().t().repeat_interleave(group, dim=1)[:n, :k]
    assert bool(((deq - w).abs() <= 0.5 * step * 1.1 + 1e-7).all())
    assert quant.int4_bytes(n, k, group, BF16) == np_ * kp // 2 + sz.numel() * 2


@pytest.mark.parametrize("method_name, options", [("int8", {}), ("int4", {"group_size": 32}),
                                                  ("int4", {"group_size": 64}), ("int4", {"group_size": 128})])
@pytest.mark.parametrize("n, k", [(7, 33), (50, 96), (48, 200)])
def test_each_method_equals_dequantize_then_matmul(method_name, options, n, k):
    """Odd N, K not a multiple of the group (padded at pack time), batch 1..8 and large."""
    w, b = _weights(n, k, seed=1), torch.randn(n) * 0.1
    method = get_linear_method(method_name, **options)
    layer = linear_holding(w, b, method)
    assert layer.weight is None
    deq = method.dequantized_weight(layer)                                           # (n, k) fp32
    half_step = w.abs().max() * (1 / 127 if method_name == "int8" else 1 / 15)     # range <= 2 max
    assert deq.shape == (n, k) and (deq - w).abs().max() <= half_step * 1.02
    if method_name == "int4":
        codes, sz = quant.quantize_int4_codes(w, options["group_size"], BF16)
        torch.testing.assert_close(deq, quant.dequantize_int4_codes(codes, sz, options["group_size"], k, n))
    g = torch.Generator().manual_seed(2)
    for m in (1, 2, 3, 5, 8, 67):
        x = torch.randn(m, k, generator=g)
        y = layer(x)
        assert y.shape == (m, n) and y.dtype == torch.float32
        expected = F.linear(x.to(BF16).float(), deq) + b
        torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
    assert layer(torch.zeros(0, k)).shape == (0, n)


def test_fused_projections_quantize_the_concatenation():
    ws = [_weights(24, 64, seed=s) for s in range(3)]
    for method in (Int8Method(), Int4Method(group_size=32)):
        parts = [linear_holding(w, None, get_linear_method("fp32")) for w in ws]
        fused = method.fuse(parts)
        x = torch.randn(4, 64)
        assert fused(x).dtype == BF16 and fused(x).shape == (4, 72)
        expected = F.linear(x.to(BF16).float(), method.dequantized_weight(fused))
        torch.testing.assert_close(fused(x).float(), expected, rtol=2e-2, atol=5e-2)


def test_the_embedding_and_head_stay_int8():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(101, 48, generator=g)
    for method in (Int8Method(), Int4Method()):
        emb = Embedding(101, 48, get_linear_method("fp32"))
        with torch.no_grad():
            emb.weight.copy_(table)
        emb.process(method)
        method.process_lm_head(emb)
        assert emb.weight is None and emb.qweight.dtype == torch.int8
        ids = torch.tensor([[0, 5, 100], [7, 7, 3]])
        rows = emb(ids)                                                              # (2, 3, 48)
        assert rows.dtype == torch.float32 and rows.shape == (2, 3, 48)
        step = emb.scales.float()[ids][..., None]
        assert bool(((rows - table[ids]).abs() <= 0.5 * step * (1 + 2 ** -7)).all())
        h = torch.randn(3, 48, generator=g)
        logits = method.logits(emb, h)
        ref = h.to(BF16).float() @ quant.dequantize_int8(emb.qweight, emb.scales, 48).t()
        torch.testing.assert_close(logits, ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("weight_dtype, options, tol", [("int8", {}, 0.03), ("int4", {"group_size": 32}, 0.12)])
def test_a_tiny_model_stays_close_to_fp32(weight_dtype, options, tol):
    """Llama-style (fused bf16 layer path) and GPT-2 (plain path, learned positions, biases)."""
    for cfg in (ef.llama_config(), ef.llama_config(tie_word_embeddings=True), ef.gpt2_config()):
        model = ef.tiny_loaded(cfg, seed=3).model
        ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = model.compute_logits(model.forward_dense(ids)[0])
            fp32_bytes = model.weight_bytes()
            set_weight_dtype(model, weight_dtype, **options)
            out = model.compute_logits(model.forward_dense(ids)[0])
        assert model.linear_method.name == weight_dtype
        assert model.weight_bytes() < 0.4 * fp32_bytes
        assert float((out - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("weight_dtype, options, agree", [("int8", {}, 16), ("int4", {"weight_group_size": 32}, 4)])
def test_llm_generates_with_quantized_weights(weight_dtype, options, agree):
    """Greedy tokens through the paged engine: int8 matches fp32's, int4 starts the same."""
    from memlm import LLM, SamplingParams
    cfg = ef.llama_config(hidden_size=128, intermediate_size=256)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 17, 99, 3, 42, 8, 64, 1]}
    ref = LLM(ef.tiny_loaded(cfg, seed=5), verbose=False, weight_dtype="fp32").generate(prompt, params)
    llm = LLM(ef.tiny_loaded(cfg, seed=5), verbose=False, weight_dtype=weight_dtype, **options)
    assert llm.model.linear_method.name == weight_dtype and llm.dtype == BF16
    out = llm.generate(prompt, params)
    assert out[0].outputs[0].token_ids[:agree] == ref[0].outputs[0].token_ids[:agree]


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^int4 group size must be one of 32, 64, 128, 256 .*got 48$"):
        get_linear_method("int4", group_size=48)
    with pytest.raises(ValueError, match=r"^group_size does not apply to int8 weights \(int8 takes no options\)$"):
        get_linear_method("int8", group_size=32)
    with pytest.raises(ValueError, match=r"^int8 weights run on the CPU only .*use weight_dtype bf16 on cuda$"):
        get_linear_method("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="weight dtype must be one of fp32, bf16, int8, int4"):
        get_linear_method("int2")
