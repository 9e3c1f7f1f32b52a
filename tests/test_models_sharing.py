"""Per-depth extras for shared layers (`ModelConfig.depth_norms / depth_gates`):
they build, reduce exactly to the plain shared model at their initial values, round-trip through a
checkpoint, and the paged engine generates the reference path's greedy tokens."""

import pytest
import torch

import engine_fakes as ef
import helpers

from memlm import LLM, SamplingParams
from memlm.errors import MemlmError
from memlm.models import Transformer
from memlm.models.blocks import DepthNorm, RMSNorm
from memlm.training.checkpoint import is_llama_shaped, load_model_dir, save_model
from memlm.training.students import count_parameters, init_weights, parse_student
from memlm.training.trainer import param_groups

BASE = "layers=4,share=all,hidden=32,heads=2,kv_heads=1,ffn=64"
VOCAB = helpers.VOCAB          # the test tokenizer's, so a saved student loads by path


def student(extras: str = "", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(parse_student(BASE + (f",per_depth={extras}" if extras else ""), VOCAB))
    init_weights(model)
    return model.eval()


def perturb_(model, std: float = 0.3) -> None:
    """Move every per-depth parameter off its initial value, so the tests see them act."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weights." in name or name.endswith("_gate"):
                p.add_(std * torch.randn(p.shape, generator=g))


def copy_shared(dst, src) -> None:
    """Copy the parameters the two models have in common (everything but per-depth extras)."""
    have = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name in have:
                have[name].copy_(p)
        for i, layer in enumerate(src.layers):             # plain norm weight -> every depth's row
            for norm in ("attn_norm", "mlp_norm"):
                target = getattr(dst.layers[i], norm)
                for row in (target.weights if isinstance(target, DepthNorm) else [target.weight]):
                    row.copy_(getattr(layer, norm).weight)


def test_spec_options_build_with_exact_parameter_counts():
    cfg = parse_student(BASE + ",per_depth=norms+gates", VOCAB)
    assert cfg.depth_norms and cfg.depth_gates and cfg.layer_order == (0,) * 4
    model = Transformer(cfg)
    assert count_parameters(cfg) == model.num_parameters()
    assert model.per_depth_parameter_names() == {
        *(f"layers.0.{n}_norm.weights.{d}" for n in ("attn", "mlp") for d in range(4)),
        "layers.0.attn_gate", "layers.0.mlp_gate"}
    plain = parse_student(BASE, VOCAB)
    # 2 norms x 4 depths x 32 instead of 2 x 32, and 2 gates x 4 depths
    assert count_parameters(cfg) - count_parameters(plain) == 2 * 3 * 32 + 2 * 4
    assert isinstance(model.layers[0].attn_norm, DepthNorm) and not isinstance(model.layers[0].attn_norm, RMSNorm)
    assert not is_llama_shaped(cfg)
    assert not (plain.depth_norms or plain.depth_gates) and Transformer(plain).per_depth_parameter_names() == set()
    with pytest.raises(MemlmError, match="per_depth"):
        parse_student(BASE + ",per_depth=norms+colour", VOCAB)


def test_plain_model_is_unchanged():
    model = student()
    names = [n for n, _ in model.named_parameters()]
    assert "layers.0.attn_norm.weight" in names and not any("weights." in n or n.endswith("_gate") for n in names)
    assert isinstance(model.layers[0].attn_norm, RMSNorm)


@pytest.mark.parametrize("extras", ["norms", "gates", "norms+gates"])
def test_extras_at_init_equal_the_plain_shared_model(extras):
    """Depth norms holding the shared weight at every depth and unit gates == plain sharing."""
    plain, extra = student(seed=1), student(extras, seed=2)
    with torch.no_grad():                                   # non-trivial shared norm weights
        for layer in plain.layers:
            layer.attn_norm.weight.uniform_(0.5, 1.5)
            layer.mlp_norm.weight.uniform_(0.5, 1.5)
    copy_shared(extra, plain)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(extra.forward_dense(ids), plain.forward_dense(ids), rtol=0, atol=0)


def test_extras_match_a_hand_written_forward():
    model = student("norms+gates")
    perturb_(model)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    layer, eps = model.layers[0], model.cfg.norm_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    x = model.embed(ids[0])
    T = x.shape[0]
    cos, sin = model.rotary.cos_sin(torch.arange(T))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for d in range(4):
        h = rms(x, layer.attn_norm.weights[d])
        a = layer.attn
        q = a.q_proj(h).view(T, 2, 16)
        k = a.k_proj(h).view(T, 1, 16)
        v = a.v_proj(h).view(T, 1, 16)
        q = q * cos + torch.cat((-q[..., 8:], q[..., :8]), -1) * sin         # RoPE, rotate-half
        k = k * cos + torch.cat((-k[..., 8:], k[..., :8]), -1) * sin
        att = torch.einsum("qhd,khd->hqk", q, k.expand(T, 2, 16)) / 4.0
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v.expand(T, 2, 16)).reshape(T, 32)
        x = x + layer.attn_gate[d] * a.o_proj(o)
        h = rms(x, layer.mlp_norm.weights[d])
        m = layer.mlp
        x = x + layer.mlp_gate[d] * m.down_proj(torch.nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))
    want = rms(x, model.final_norm.weight)
    torch.testing.assert_close(model.forward_dense(ids)[0], want, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    model = student("norms+gates")
    perturb_(model)
    save_model(model, tmp_path)
    back = load_model_dir(tmp_path)
    assert back.cfg == model.cfg
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(back.forward_dense(ids), model.forward_dense(ids), rtol=0, atol=0)


@pytest.mark.parametrize("extras", ["norms+gates", "gates"])
def test_paged_engine_matches_reference(extras):
    model = student(extras).requires_grad_(False)
    perturb_(model)
    loaded = ef.LoadedModel(config=model.cfg, model=model, tokenizer=ef.ByteTokenizer(), source="random",
                            format="memlm", weight_bytes=model.weight_bytes())
    prompts = ef.random_prompts(6, 1, 40, seed=1)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = LLM(loaded, engine="reference").generate(prompts, sp, use_tqdm=False)
    out = LLM(loaded, engine="paged", verbose=False, num_kv_blocks=32, max_num_batched_tokens=24,
              max_num_seqs=4, kv_dtype="float32").generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]


def test_per_depth_parameters_keep_the_base_lr():
    """A shared block trains at lr * layer_lr_scale; its per-depth rows act once per token, like
    the embedding, and keep the base lr (and, being vectors, no weight decay)."""
    model = student("norms+gates")
    per_depth = model.per_depth_parameter_names()
    groups = param_groups([model], 0.1, layer_lr_scale=0.25)
    group_of = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        want = 0.25 if name.startswith("layers.") and name not in per_depth else 1.0
        assert group_of[id(p)]["lr_scale"] == want, name
        if name in per_depth:
            assert group_of[id(p)]["weight_decay"] == 0.0


def test_saved_student_runs_by_path_in_the_bf16_engine(tmp_path):
    """`memlm generate --model <dir>` path: the loader builds the student from its config, the bf16
    codec leaves DepthNorm layers unfused (DecoderLayer.forward), and the paged engine's greedy
    tokens equal the reference path's."""
    model = student("norms+gates")
    perturb_(model)
    save_model(model, tmp_path, tokenizer=None)
    helpers.train_tokenizer(tmp_path)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ef.random_prompts(3, 2, 20, seed=5)
    paged = LLM(str(tmp_path), dtype="bfloat16", verbose=False, num_kv_blocks=16, kv_dtype="float32")
    assert paged.config.depth_norms and paged.config.depth_gates
    assert all("forward" not in vars(layer) for layer in paged.model.layers)   # not fused
    # the fp32 reference: the reference engine's fp32 cache does not take bf16 queries from an
    # unfused layer; on these prompts bf16 rounding does not change a greedy token
    ref = LLM(str(tmp_path), engine="reference", dtype="float32")
    assert ([o.outputs[0].token_ids for o in paged.generate(prompts, sp, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in ref.generate(prompts, sp, use_tqdm=False)])
