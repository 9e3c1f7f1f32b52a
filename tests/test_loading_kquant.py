"""GGUF Q4_K / Q5_K / Q6_K tensors kept as loaded: each projection and the tied embedding hold the
file's super-blocks (copied once from the map, never dequantized), equal to
`gguf.quants.dequantize`; the model computes what the same weights dequantized to fp32
compute (greedy tokens too), natively and with MEMLM_NATIVE=0; `auto` keeps the file's
precision; the load estimate knows the bytes; an unsupported type is a one-line error."""
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import helpers
from memlm.errors import UnsupportedModelError
from memlm.kernels import kquant
from memlm.loading import estimate_load_bytes, gguf as gguf_loader, load_model, native_weight_dtype

PROJECTIONS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def _tiny_llama(root: Path) -> Path:
    """A random 2-layer Llama wide enough for 256-weight super-blocks (hidden 256, mlp 512)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=helpers.VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=True, initializer_range=0.05, bos_token_id=1, eos_token_id=2)
    return helpers._save(transformers.LlamaForCausalLM(cfg).eval(), root)


def _quantize(data: np.ndarray, qtype):
    """gguf.quants.quantize, plus the K-quants (memlm's round-to-nearest quantizer)."""
    name = T(qtype).name.lower()
    if name in kquant.CODECS:
        return kquant.quantize(torch.from_numpy(np.ascontiguousarray(data)), name).blocks.numpy()
    return _gguf_quantize(data, qtype)


_gguf_quantize = gguf.quants.quantize


def _write(root: Path, hf: Path, types: dict, monkeypatch) -> Path:
    path = root / ("tiny_" + "_".join(sorted({t.name for t in types.values()})) + ".gguf")
    if not path.exists():
        monkeypatch.setattr(gguf.quants, "quantize", _quantize)
        helpers.write_tiny_llama_gguf(path, hf, types=types)
        monkeypatch.undo()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquant")
    hf = _tiny_llama(root / "hf")
    mp = pytest.MonkeyPatch()
    out = {q: _write(root, hf, {n: q for n in PROJECTIONS} | {"token_embd.weight": T.Q6_K}, mp)
           for q in (T.Q4_K, T.Q5_K, T.Q6_K)}
    # a Q4_K_M-like mix: v and down in Q6_K, the rest Q4_K, the embedding Q8_0
    mixed = {n: T.Q4_K for n in PROJECTIONS} | {"attn_v.weight": T.Q6_K, "ffn_down.weight": T.Q6_K,
                                                 "token_embd.weight": T.Q8_0}
    out["mixed"] = _write(root, hf, mixed, mp)
    return out


def _logits(model, ids):
    with torch.inference_mode():
        return model.compute_logits(model.forward_dense(ids)[0])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("qtype, weight_dtype", [(T.Q4_K, "int4"), (T.Q5_K, "int4"), (T.Q6_K, "int8")])
def test_kquant_blocks_are_kept_and_compute_the_dequantized_model(files, qtype, weight_dtype, native,
                                                                  monkeypatch):
    if native and not kquant.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    if not native:
        monkeypatch.setattr(kquant, "available", lambda: False)
    path, codec = files[qtype], qtype.name.lower()
    kept = load_model(path, weight_dtype=weight_dtype)
    codecs = kept.model.linear_method.bytes_by_codec(kept.model)
    assert set(codecs) == {codec, "q6_k", "fp32"}                # fp32: the norms only
    layer = kept.model.layers[1]
    assert layer.attn.qkv_proj.block_weight.codec == codec and layer.attn.qkv_proj.out_features == 256 + 2 * 128
    reference = load_model(path)                    # the same weights dequantized to fp32 (gguf-py)
    method = kept.model.linear_method
    assert torch.equal(method.dequantized_weight(layer.mlp.down_proj), reference.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(kept.model.embed(torch.tensor([3, 7])), reference.model.embed.weight[[3, 7]])
    ids = torch.arange(1, 12).view(1, -1)
    a, b = _logits(kept.model, ids), _logits(reference.model, ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()   # bf16 residual-path roundings, 8-bit activations
    prompt = [5, 9, 17, 33]
    assert helpers.greedy_memlm(kept.model, prompt, 6) == helpers.greedy_memlm(reference.model, prompt, 6)


def test_blocks_are_copied_from_the_map_never_dequantized(files, monkeypatch):
    seen = []
    real = gguf_loader._dequantize
    monkeypatch.setattr(gguf_loader, "_dequantize", lambda f, t: seen.append(t.name) or real(f, t))
    kept = load_model(files[T.Q4_K], weight_dtype="int4")
    assert seen == [] or all(name.endswith("norm.weight") for name in seen)
    f = gguf_loader.open_gguf(files[T.Q4_K])
    raw = f.raw(f.tensors["blk.0.ffn_down.weight"])
    assert torch.equal(kept.model.layers[0].mlp.down_proj.blocks, torch.from_numpy(np.array(raw)))


def test_mixed_kquant_file(files):
    """A Q4_K_M-like mix keeps every codec: q|k|v fuses Q4_K q, k and a Q6_K v as parts."""
    assert native_weight_dtype(files["mixed"]) == "int4"
    kept = load_model(files["mixed"], weight_dtype="int4")
    codecs = kept.model.linear_method.bytes_by_codec(kept.model)
    assert set(codecs) == {"q4_k", "q6_k", "q8_0", "fp32"}
    qkv = kept.model.layers[0].attn.qkv_proj.block_weight
    assert [(p.codec, p.out_features) for p in qkv.parts] == [("q4_k", 256), ("q4_k", 128), ("q6_k", 128)]
    assert not kept.model.layers[0].block_step                   # decode_q.c reads Q8_0 / Q4_x only
    reference = load_model(files["mixed"])
    method, ref_attn = kept.model.linear_method, reference.model.layers[0].attn
    assert torch.equal(method.dequantized_weight(kept.model.layers[0].attn.qkv_proj),
                       torch.cat([ref_attn.q_proj.weight, ref_attn.k_proj.weight, ref_attn.v_proj.weight]))
    weights, _ = estimate_load_bytes(files["mixed"], "int4")
    assert weights == kept.weight_bytes
    ids = torch.arange(1, 9).view(1, -1)
    a, b = _logits(kept.model, ids), _logits(reference.model, ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    prompt = [5, 9, 17, 33]
    assert helpers.greedy_memlm(kept.model, prompt, 6) == helpers.greedy_memlm(reference.model, prompt, 6)


def test_load_estimate_and_auto(files):
    for qtype, weight_dtype in [(T.Q4_K, "int4"), (T.Q5_K, "int4"), (T.Q6_K, "int8")]:
        assert native_weight_dtype(files[qtype]) == weight_dtype
        weights, largest = estimate_load_bytes(files[qtype], weight_dtype)
        assert weights == load_model(files[qtype], weight_dtype=weight_dtype).weight_bytes
        assert largest < helpers.VOCAB * 256 * 4             # no tensor staged in fp32


def test_unsupported_type_is_one_line(tmp_path):
    path = tmp_path / "q8_1.gguf"
    hf = helpers.make_tiny_hf_llama(tmp_path / "hf")
    helpers.write_tiny_llama_gguf(path, hf)
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name)                  # then u32 n_dims, u64 dims[n], u32 type
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == 0     # F32
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    for type_id, named in [(9, "Q8_1"), (99, "99")]:    # known to gguf-py but not loadable; unknown
        data[type_at:type_at + 4] = type_id.to_bytes(4, "little")
        bad = tmp_path / f"bad_{type_id}.gguf"
        bad.write_bytes(bytes(data))
        with pytest.raises(UnsupportedModelError) as e:
            load_model(bad)
        msg = str(e.value)
        assert "\n" not in msg and named in msg and "Q4_K, Q5_K, Q6_K" in msg and "ffn_up" in msg
