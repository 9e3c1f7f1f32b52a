"""The decoder over the reference caches: chunked cache steps == one dense pass, layer sharing,
GQA and the recurrent mixer's chunked scan."""
import pytest
import torch

from memlm.config import ModelConfig
from memlm.models.kv import ContiguousCache, causal_attention
from memlm.models.transformer import Transformer


def _tiny(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=48, max_position_embeddings=128)
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**base)).eval()


def _run_chunks(model, ids, chunks):
    cfg = model.cfg
    cache = ContiguousCache(cfg.num_kv_heads, cfg.head_dim, cfg.depth, 64)
    outs, start = [], 0
    for n in chunks:
        piece = ids[start:start + n]
        cache.begin_step(len(piece))
        outs.append(model(piece, torch.arange(cache.length, cache.length + len(piece)), cache))
        cache.end_step()
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("kw", [
    {},
    {"norm": "layer", "mlp": "gelu", "activation": "gelu_tanh", "position": "learned",
     "num_kv_heads": 4, "qkv_bias": True, "o_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    {"mixers": ("attention", "recurrent"), "layer_order": (0, 1, 1, 0)},
    {"num_layers": 1, "layer_order": (0, 0, 0)},
])
@torch.no_grad()
def test_cache_steps_match_dense(kw):
    model = _tiny(**kw)
    ids = torch.randint(0, 97, (40,))
    dense = model.forward_dense(ids[None])[0]
    stepped = _run_chunks(model, ids, [5, 1, 1, 17, 16])
    torch.testing.assert_close(stepped, dense, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_gqa_equals_mha_with_repeated_heads():
    gqa = _tiny()
    mha = _tiny(num_kv_heads=4)
    sd = gqa.state_dict()
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.attn.{name}.weight"].view(2, 8, 32)
            sd[f"layers.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(mha.forward_dense(ids), gqa.forward_dense(ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_shared_layers_share_parameters():
    shared = _tiny(num_layers=1, layer_order=(0, 0, 0, 0))
    unshared = _tiny(num_layers=4)
    assert shared.num_parameters() < unshared.num_parameters()
    hidden = []
    shared.forward_dense(torch.randint(0, 97, (1, 6)), hidden_states=hidden)
    assert len(hidden) == 4


def test_recurrent_scan_matches_sequential_recurrence():
    model = _tiny(mixers=("recurrent", "attention"))
    cell = model.layers[0].attn
    x = torch.randn(2, 37, 32)
    y, h = cell.scan(x, None)
    a_logit, cand, gate = cell.in_proj(x).chunk(3, dim=-1)
    a = torch.sigmoid(a_logit)
    state = torch.zeros(2, 32)
    hs = []
    for t in range(37):
        state = a[:, t] * state + (1 - a[:, t]) * cand[:, t]
        hs.append(state)
    ref = cell.out_proj(torch.stack(hs, 1) * torch.nn.functional.silu(gate))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h, state, atol=1e-5, rtol=1e-4)


def test_learned_positions_past_limit_raise():
    model = _tiny(position="learned", max_position_embeddings=8)
    with pytest.raises(ValueError, match="learned positions"):
        model.forward_dense(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("T,offset,extra", [(37, 0, 0), (1, 20, 11), (29, 40, 3), (16, 0, 0), (5, 11, 0)])
def test_causal_attention_pads_keys_and_never_sees_past_the_last_query(T, offset, extra):
    """Odd key counts are padded to 16 for SDPA's CPU kernel, and keys past q_offset + T (a KV
    block's unused tail) are masked: both equal plain masked softmax attention."""
    g = torch.Generator().manual_seed(T + offset)
    q = torch.randn(2, 6, T, 8, generator=g)
    L = offset + T
    k, v = torch.randn(2, 2, L + extra, 8, generator=g), torch.randn(2, 2, L + extra, 8, generator=g)
    out = causal_attention(q, k, v, q_offset=offset)
    kk, vv = k[:, :, :L].repeat_interleave(3, 1), v[:, :, :L].repeat_interleave(3, 1)
    scores = q @ kk.transpose(-1, -2) / 8 ** 0.5
    visible = torch.arange(L)[None, :] <= torch.arange(offset, L)[:, None]
    ref = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
