"""Linear methods: the factory picks a method by weight dtype, a method added as one file is
usable, the fp32 method keeps nn.Linear's init and names, and the bf16 method (prepacked
weights, fused q/k/v and gate/up, the fused layer path, the refined LM head) stays close to fp32."""
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine_fakes as ef

import memlm.models.linear as linear
from engine_fakes import linear_holding
from memlm.kernels import cpu
from memlm.models.linear import Embedding, Linear, bf16, get_linear_method, set_weight_dtype
from memlm.models.linear.bf16 import Bf16Method, CastCache
from memlm.models.linear.fp32 import Fp32Method
from memlm.models.transformer import Transformer

MEMLM = Path(linear.__file__).resolve().parents[2]



def test_the_factory_picks_the_method_by_weight_dtype_name():
    assert type(get_linear_method()) is Fp32Method
    for spelling in ("fp32", "float32", torch.float32):
        assert type(get_linear_method(spelling)) is Fp32Method
    for spelling in ("bf16", "bfloat16", "torch.bfloat16", torch.bfloat16):
        assert type(get_linear_method(spelling)) is Bf16Method
    cpu_method = get_linear_method("bf16", "cpu")               # packed unless the native decode holds it plain
    assert cpu_method.pack != cpu_method.native_decode and not get_linear_method("bf16", torch.device("cuda")).pack
    a, b = get_linear_method("bf16"), get_linear_method("bf16")
    assert a is not b and a.cast is not b.cast                 # one method object (and cast cache) per model
    assert linear.available_weight_dtypes() == ("fp32", "bf16", "int8", "int4")
    with pytest.raises(ValueError, match="weight dtype must be one of fp32, bf16, int8, int4"):
        get_linear_method("fp16")


TOY_METHOD = '''
    """A toy format named int2 (the one dtype without a method): per-row symmetric int8
    weights, dequantized on the fly."""
    import torch
    import torch.nn.functional as F

    from memlm.models.linear.base import Linear, register
    from memlm.models.linear.fp32 import Fp32Method


    @register
    class ToyMethod(Fp32Method):
        name = "int2"

        def process_weights_after_loading(self, layer):
            w = layer.weight.detach()
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
            layer.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
            layer.register_buffer("scale", scale)
            layer.weight = None

        def apply(self, layer, x):
            return F.linear(x, layer.qweight.float() * layer.scale, layer.bias)

        def logits(self, head, hidden):
            return self.apply(head, hidden) if isinstance(head, Linear) else super().logits(head, hidden)
'''


def test_a_method_added_as_one_file_is_usable(tmp_path, monkeypatch):
    """Adding a weight format is one new module named after its dtype, nothing else."""
    (tmp_path / "int2.py").write_text(textwrap.dedent(TOY_METHOD))
    monkeypatch.setattr(linear, "__path__", [*linear.__path__, str(tmp_path)])
    try:
        assert "int2" in linear.available_weight_dtypes()
        model = ef.tiny_loaded(ef.llama_config(), seed=3).model
        ids = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = model.compute_logits(model.forward_dense(ids)[0])
            fp32_bytes = model.weight_bytes()
            set_weight_dtype(model, "int2")
            assert model.linear_method.name == "int2" and model.layers[0].attn.q_proj.weight is None
            out = model.compute_logits(model.forward_dense(ids)[0])
        assert model.weight_bytes() < 0.5 * fp32_bytes          # int8 buffers counted, fp32 weights gone
        assert (out - ref).norm() / ref.norm() < 3e-2
    finally:
        linear.METHODS.pop("int2", None)
        sys.modules.pop("memlm.models.linear.int2", None)


def test_fp32_layers_keep_nn_linear_init_and_names():
    """Students are built directly: same random init as nn.Linear / nn.Embedding, same state_dict
    keys (checkpoints and HF export), and `init_weights=False` draws nothing."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(24, 40, bias=True)
    torch.manual_seed(0)
    ours = Linear(24, 40, True, get_linear_method())
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    assert set(ours.state_dict()) == set(ref.state_dict())
    torch.manual_seed(0)
    emb_ref = torch.nn.Embedding(30, 8)
    torch.manual_seed(0)
    assert torch.equal(Embedding(30, 8, get_linear_method()).weight, emb_ref.weight)

    cfg = ef.llama_config()
    keys = set(Transformer(cfg).state_dict())
    assert {"embed.weight", "lm_head.weight", "layers.0.attn.q_proj.weight", "layers.1.mlp.gate_proj.weight",
            "layers.1.mlp.down_proj.weight"} <= keys
    assert not any("method" in k or "qkv" in k or "packed" in k for k in keys)
    state = torch.get_rng_state()
    Transformer(cfg, init_weights=False)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("native", ["0", "1"])
def test_bf16_linear_packed_equals_dense(native, monkeypatch):
    """Packed (oneDNN) on a CPU gives exactly what a GPU-bound dense layer gives; the native
    decode kernels (fp32 output, no bf16 rounding of y) agree to bf16 resolution."""
    monkeypatch.setenv("MEMLM_BF16_DECODE", native)
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(72, 40, generator=g), torch.nn.Linear(40, 72, bias=True).bias.detach()
    layer = linear_holding(w, b, Bf16Method("cpu"))
    x = torch.randn(5, 40, generator=g)
    expected = F.linear(x.bfloat16(), w.bfloat16()).float() + b
    torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)
    assert (layer.packed is None) == (layer.weight is not None)     # exactly one copy is held
    dense = linear_holding(w, b, Bf16Method(torch.device("cuda")))           # what a GPU-bound model gets
    assert dense.packed is None and dense.weight.dtype == torch.bfloat16
    exact = not layer.method.native_decode
    torch.testing.assert_close(dense(x), layer(x), rtol=0 if exact else 1e-2, atol=0 if exact else 1e-2)


def test_cast_cache_casts_each_input_once():
    cast = CastCache()
    x = torch.randn(3, 8)
    first = cast(x)
    assert first.dtype == torch.bfloat16 and first.shape == (cpu.row_bucket(3), 8)
    assert cast(x) is first and cast(x.clone()) is not first
    assert [cpu.row_bucket(m) for m in (1, 2, 3, 5, 256, 257, 600)] == [1, 2, 4, 8, 256, 512, 768]


def test_fused_bf16_layers_stay_close_to_fp32():
    """The whole method on a tiny Llama (fused q/k/v, gate/up, fused layer path) vs fp32."""
    loaded = ef.tiny_loaded(ef.llama_config(), seed=5)
    model = loaded.model
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    fp32_bytes, params = model.weight_bytes(), model.num_parameters()
    with torch.inference_mode():
        ref = model.forward_dense(ids)
        set_weight_dtype(model, "bf16")
        assert 0.45 * fp32_bytes < model.weight_bytes() < 0.55 * fp32_bytes   # packed copies counted
        assert model.num_parameters() == params
        assert all(layer.attn.qkv_proj is not None and layer.fused for layer in model.layers)
        out = model.forward_dense(ids)
    assert out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


@pytest.mark.parametrize("cfg", [ef.llama_config(), ef.gpt2_config(), ef.llama_config(tie_word_embeddings=True),
                                 ef.llama_config(mixers=("attention", "recurrent"))],
                         ids=["llama", "gpt2", "tied", "recurrent"])
def test_converting_fp32_to_bf16_keeps_logits_close(cfg):
    model = ef.tiny_loaded(cfg, seed=6).model
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model.compute_logits(model.forward_dense(ids)[0])
        assert set_weight_dtype(model, "bfloat16") is model and model.linear_method.name == "bf16"
        assert set_weight_dtype(model, "bf16") is model            # already bf16: nothing to do
        out = model.compute_logits(model.forward_dense(ids)[0])
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 3e-2
    assert all(layer.fused == (cfg.arch == "llama" and m == "attention")
               for layer, m in zip(model.layers, cfg.mixers))
    with pytest.raises(ValueError, match="already bf16"):
        set_weight_dtype(model, "fp32")


def test_bf16_linear_fused_bias_and_gelu_post_op():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(96, 32, generator=g) * 0.2, torch.randn(96, generator=g)
    method = Bf16Method("cpu")
    layer = linear_holding(w, b, method)
    layer.set_out_dtype(torch.bfloat16)
    if layer.packed is None:
        pytest.skip("oneDNN weight packing is not available here")
    x = torch.randn(7, 32, generator=g)
    expected = F.linear(x.bfloat16().float(), w.bfloat16().float(), b)
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert method.fuse_activation(layer, "gelu_tanh") and layer.post_op == ("gelu", "tanh")
    torch.testing.assert_close(layer(x).float(), F.gelu(expected, approximate="tanh"), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_logits_recompute_the_top_candidates_in_fp32(tie):
    """bf16 matmul output rounds logits to a coarse step; the top REFINE_TOP of each row must be
    the fp32 dot products of the unrounded hidden state with the (bf16) head rows."""
    loaded = ef.tiny_loaded(ef.llama_config(tie_word_embeddings=tie), seed=7)
    model = set_weight_dtype(loaded.model, "bf16")
    hidden = torch.randn(5, model.cfg.hidden_size, generator=torch.Generator().manual_seed(4)) * 8
    with torch.inference_mode():
        logits = model.compute_logits(hidden)
    head = model.embed.weight if tie else model.lm_head.weight
    exact = hidden @ head.float().T
    top = logits.topk(bf16.REFINE_TOP, dim=-1).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-4)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))


def test_warm_up_runs_every_bf16_shape():
    model = set_weight_dtype(ef.tiny_loaded(ef.llama_config(), seed=1).model, "bf16")
    model.warm_up(40)                                 # buckets 1..64, every weight shape and the head
    fp32 = ef.tiny_loaded(ef.llama_config(), seed=1).model
    fp32.warm_up(40)                                  # the fp32 method keeps no per-shape state


def test_no_module_assigns_forwards_or_initialisers():
    """The code that runs is the code in the class: nothing in memlm/ patches a method at run time."""
    pattern = re.compile(r"^\s*[\w.\[\]]+\.(forward|compute_logits|reset_parameters)\s*=(?!=)", re.M)
    hits = [f"{p.relative_to(MEMLM)}: {m.group(0).strip()}" for p in sorted((MEMLM / "memlm").rglob("*.py"))
            for m in pattern.finditer(p.read_text())]
    assert hits == []
    assert not (MEMLM / "memlm" / "memory" / "weights.py").exists()
