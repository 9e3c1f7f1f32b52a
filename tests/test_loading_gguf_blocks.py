"""GGUF Q8_0 / Q4_0 / Q4_1 tensors kept as loaded: the projections and the tied embedding hold
the file's blocks (no fp32 copy), the model computes what the same weights dequantized to fp32
compute, the load estimate knows the blocks' bytes, and `auto` picks the file's precision."""
import pytest
import torch
from gguf import GGMLQuantizationType as T

from helpers import make_tiny_hf_llama, write_tiny_llama_gguf
from memlm.kernels import gemv
from memlm.loading import estimate_load_bytes, load_model, native_weight_dtype

PROJECTIONS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def _write(root, proj_type, table_type):
    path = root / f"tiny_{proj_type.name}.gguf"
    types = {name: proj_type for name in PROJECTIONS} | {"token_embd.weight": table_type}
    write_tiny_llama_gguf(path, make_tiny_hf_llama(root / "hf", tie=True), types=types)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    return {t: _write(root, t, T.Q8_0) for t in (T.Q4_1, T.Q4_0, T.Q8_0)}


def _logits(model, ids):
    with torch.inference_mode():
        return model.compute_logits(model.forward_dense(ids)[0])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("qtype, weight_dtype", [(T.Q4_1, "int4"), (T.Q4_0, "int4"), (T.Q8_0, "int8")])
def test_blocks_are_kept_and_compute_the_dequantized_model(files, qtype, weight_dtype, native, monkeypatch):
    if native and not gemv.available():
        pytest.skip("no C compiler / MEMLM_NATIVE=0")
    if not native:
        monkeypatch.setattr(gemv, "available", lambda: False)
    path = files[qtype]
    kept = load_model(path, weight_dtype=weight_dtype)
    codecs = kept.model.linear_method.bytes_by_codec(kept.model)
    assert set(codecs) == {qtype.name.lower(), "q8_0", "fp32"}     # fp32: the norms only
    assert codecs["fp32"] == sum(p.numel() * 4 for p in kept.model.parameters() if p.dim() == 1)
    fused = kept.model.layers[0].attn.qkv_proj
    assert fused.block_weight.codec == qtype.name.lower() and fused.out_features == 64 + 2 * 32
    reference = load_model(path)                    # the same weights dequantized to fp32
    ids = torch.arange(1, gemv.TILE_MIN_ROWS).view(1, -1)       # the block kernels (tiles: test_kernels_gemv)
    a, b = _logits(kept.model, ids), _logits(reference.model, ids)
    # only the bf16 residual-path roundings of the fused decoder layer differ
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9     # near-ties of a random model may flip
    dense = reference.model.layers[1].mlp.down_proj.weight
    assert torch.equal(kept.model.linear_method.dequantized_weight(kept.model.layers[1].mlp.down_proj), dense)
    assert torch.equal(kept.model.embed(torch.tensor([3, 7])), reference.model.embed.weight[[3, 7]])


def test_load_estimate_counts_the_blocks(files):
    for qtype, weight_dtype in [(T.Q4_1, "int4"), (T.Q8_0, "int8")]:
        weights, _ = estimate_load_bytes(files[qtype], weight_dtype)
        assert weights == load_model(files[qtype], weight_dtype=weight_dtype).weight_bytes


def test_other_group_sizes_requantize(files):
    """int4 at group 128 is not the file's groups of 32: its projections are requantized."""
    loaded = load_model(files[T.Q4_1], weight_dtype="int4", group_size=128)
    assert set(loaded.model.linear_method.bytes_by_codec(loaded.model)) == {"int4 g128", "q8_0", "fp32"}


def test_auto_keeps_the_files_precision(files, tmp_path):
    assert native_weight_dtype(files[T.Q4_1]) == native_weight_dtype(files[T.Q4_0]) == "int4"
    assert native_weight_dtype(files[T.Q8_0]) == "int8"
    f32 = tmp_path / "f32.gguf"
    write_tiny_llama_gguf(f32, make_tiny_hf_llama(tmp_path / "hf", tie=True))
    assert native_weight_dtype(f32) is None and native_weight_dtype(tmp_path / "missing.gguf") is None


def test_llm_auto_runs_the_files_blocks(files):
    from memlm import LLM, SamplingParams
    llm = LLM(str(files[T.Q4_1]), verbose=False)
    assert llm.weight_dtype == "int4" and llm.model.layers[0].mlp.gate_up_proj.block_weight.codec == "q4_1"
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4,
                                                                        ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
