"""Weight storage codec: bf16 weights and matmuls, fp32 residual stream.

Owns: turning a loaded model's `nn.Linear` / `nn.Embedding` layers (and the LM head) into bf16
storage. q/k/v and gate/up projections are fused into one matmul each. What stays fp32: the
residual stream, norms, decode attention and sampling (a bf16 residual stream is what hurts
small models). What runs in bf16: the matmuls, the q/k/v heads between their projection and
attention (RoPE, prefill attention; the KV cache is fp16 anyway) and the MLP's inner
activation; each is rounded to bf16 once, where a bf16 matmul would round it anyway.
Halves weight memory and removes most fp32<->bf16 copies; on CPUs with AMX bf16 matmuls run
~5x faster than fp32 (measured by `runner.bf16_matmul_is_fast`).
Does not know: which model it is beyond the `qkv_proj` / `gate_up_proj` slots the blocks offer;
it rewrites modules in place. Switch it off with `LLM(dtype="float32")`.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.memory import fused_ops


def row_bucket(m: int) -> int:
    """Rows a bf16 matmul is padded to: 1, 2, 4, ..., 256, then multiples of 256.

    oneDNN keeps state for every distinct matmul shape it has seen (~0.7 MiB per row count per
    weight, measured), so unpadded row counts 1..2048 would grow RSS by hundreds of MiB behind
    the budget's back. Buckets bound the shapes to 16 per weight up to 2048 rows; `warm_up`
    creates them all before the engine's profile step, and the budget counts them as resident.
    Padding is cheap where it happens: up to 256 rows the matmuls are bound by reading the
    weights, not by the rows; above, busy steps are full (exactly max_num_batched_tokens).
    """
    if m <= 256:
        return 1 << max(0, (m - 1).bit_length())
    return -(-m // 256) * 256


def _padded_bf16(x: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (row_bucket(M), K) bf16, zero rows appended."""
    m = x.shape[0]
    xb = x.to(torch.bfloat16)
    pad = row_bucket(m) - m
    return F.pad(xb, (0, 0, 0, pad)) if pad else xb


class _CastCache:
    """The padded bf16 copy of the last input: projections that read the same x cast it once.
    Holds one tensor; compared by identity."""

    def __init__(self):
        self.src: torch.Tensor | None = None
        self.bf16: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.src:
            self.src, self.bf16 = x, _padded_bf16(x)
        return self.bf16


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The bf16 weight in oneDNN's blocked layout, or None where that is not available.

    A plain bf16 `F.linear` re-blocks the weight on every call; packed once, decode-sized
    matmuls (8-128 rows) ran 1.6-1.8x faster on the AMX machine (1.15x at 512 rows), with
    bit-identical results. The packed copy is checked against `F.linear` before it is used.
    """
    if weight.device.type != "cpu" or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        x = torch.randn(3, weight.shape[1], dtype=torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        if not torch.allclose(y.float(), F.linear(x, weight).float(), rtol=1e-2, atol=1e-2):
            return None
    except (RuntimeError, AttributeError):
        return None
    return packed


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights as held after `use_bf16_matmuls` (packed copies included)."""
    packed = sum(m.out_features * m.in_features * 2 for m in model.modules()
                 if isinstance(m, Bf16Linear) and m.packed is not None)
    head = getattr(model, "lm_head_packed", None)
    if head is not None:
        packed += model.embed.weight.numel() * 2
    return model.weight_bytes() + packed


def num_parameters(model: nn.Module) -> int:
    """Parameter count of a model before or after `use_bf16_matmuls` (prepacked weights are not
    nn.Parameters, so `model.num_parameters()` alone misses them)."""
    packed = sum(m.out_features * m.in_features for m in model.modules()
                 if isinstance(m, Bf16Linear) and m.packed is not None)
    return model.num_parameters() + packed


class Bf16Linear(nn.Module):
    """y = x @ W^T + b with W stored in bf16; x cast to bf16 for the matmul.

    y comes back in `out_dtype`: fp32 where it joins the residual stream, bf16 where the next
    consumer is bf16 anyway (attention heads, the MLP's inner activation).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cast: _CastCache,
                 out_dtype: torch.dtype = torch.float32, pack: bool = True):
        super().__init__()
        dense = weight.detach().to(torch.bfloat16)
        self.packed = prepack(dense) if pack else None
        # Only one copy is kept: the oneDNN-packed one when packing works here, else the dense.
        self.weight = None if self.packed is not None else nn.Parameter(dense, requires_grad=False)
        self.in_features, self.out_features = dense.shape[1], dense.shape[0]
        self.bias = (None if bias is None
                     else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False))
        self._cast = cast
        self.out_dtype = out_dtype
        self.post_op = ("none", "")   # oneDNN post-op (name, algorithm); packed bf16 output only

    @classmethod
    def fuse(cls, linears: list[nn.Linear], cast: _CastCache, out_dtype=torch.float32,
             pack: bool = True) -> "Bf16Linear":
        """One matmul for several projections of the same input: outputs concatenated."""
        weight = torch.cat([m.weight.detach().to(torch.bfloat16) for m in linears])
        biases = [m.bias for m in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(m.out_features)
             for b, m in zip(biases, linears)])
        return cls(weight, bias, cast, out_dtype, pack)

    def set_out_dtype(self, dtype: torch.dtype) -> None:
        self.out_dtype = dtype
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])                                           # (M, K)
        xb = self._cast(x2)
        if self.packed is not None and self.out_dtype == torch.bfloat16:
            # bias and activation ride in the matmul as oneDNN post-ops: one pass over y
            y = torch.ops.mkldnn._linear_pointwise(xb, self.packed, self.bias, self.post_op[0], [],
                                                   self.post_op[1])[:x2.shape[0]]
            return y.view(*lead, y.shape[-1])
        y = (F.linear(xb, self.weight) if self.packed is None
             else torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], ""))
        y = y[:x2.shape[0]].to(self.out_dtype)                                    # (M, N)
        y = y if self.bias is None else y + self.bias
        return y.view(*lead, y.shape[-1])


class Bf16Embedding(nn.Module):
    """A lookup table stored in bf16 that returns fp32 rows."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.weight = nn.Parameter(emb.weight.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


REFINE_TOP = 16   # logits recomputed exactly (fp32) per row, see _bf16_logits


def _bf16_logits(self, hidden: torch.Tensor) -> torch.Tensor:
    """(n, H) fp32 -> (n, vocab) fp32 logits through the bf16 LM head.

    The bf16 matmul rounds its *output* to bf16: at logit ~16 that is a 0.125 step, enough to
    tie candidates fp32 keeps 0.08 apart (it flipped SmolLM2's first answer token). So the
    REFINE_TOP largest logits of each row are recomputed in fp32 from the unrounded hidden
    state and the (bf16-exact) head rows; the tail keeps bf16 resolution.
    """
    head = getattr(self, "lm_head", None)
    if isinstance(head, Bf16Linear):                                   # untied head: its own layer
        y, weight, bias = head(hidden), head.weight, head.bias
        if weight is None:                                             # packed only: no rows to reread
            return y.float()
    else:
        x = _padded_bf16(hidden)
        packed = getattr(self, "lm_head_packed", None)
        y = (F.linear(x, self.lm_head_weight) if packed is None
             else torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
        y, weight, bias = y[:hidden.shape[0]], self.lm_head_weight, None
    return fused_ops.bf16_logits_refine(y, hidden.float().contiguous(), weight, REFINE_TOP, bias)


def warm_up(model: nn.Module, max_rows: int) -> None:
    """Run every bf16 weight shape at every row bucket up to `max_rows` once (see row_bucket)."""
    layers = {(m.out_features, m.in_features, m.packed is None): m for m in model.modules()
              if isinstance(m, Bf16Linear)}
    head = getattr(model, "lm_head_weight", None)
    has_head = isinstance(head, torch.Tensor) and head.dtype == torch.bfloat16
    if not layers and not has_head:
        return
    buckets = sorted({row_bucket(m) for m in range(1, max_rows + 1)})
    with torch.inference_mode():
        for b in buckets:
            for m in layers.values():
                m(torch.zeros(b, m.in_features, dtype=torch.bfloat16))
            if has_head:
                model.compute_logits(torch.zeros(b, head.shape[1]))


def _fuse_projections(model: nn.Module, cast: _CastCache, pack: bool) -> None:
    """q/k/v -> one `qkv_proj`, gate/up -> one `gate_up_proj` (bf16 out), freeing the parts."""
    bf16 = torch.bfloat16
    for mod in model.modules():
        if getattr(mod, "qkv_proj", False) is None and hasattr(mod, "q_proj"):
            mod.qkv_proj = Bf16Linear.fuse([mod.q_proj, mod.k_proj, mod.v_proj], cast, bf16, pack)
            del mod.q_proj, mod.k_proj, mod.v_proj
        if getattr(mod, "gate_up_proj", False) is None and getattr(mod, "gated", False):
            mod.gate_up_proj = Bf16Linear.fuse([mod.gate_proj, mod.up_proj], cast, bf16, pack)
            del mod.gate_proj, mod.up_proj


def _fused_layer_forward(self, x: torch.Tensor, depth: int, kv, rope):
    """`DecoderLayer.forward` for an RMSNorm / attention / SwiGLU layer with fused projections:
    the same math with the norms, RoPE and SwiGLU in single passes (`fused_ops`)."""
    attn, mlp = self.attn, self.mlp
    N, nh, nkv, hd = x.shape[0], attn.n_heads, attn.n_kv, attn.hd
    x = x.contiguous()
    h = fused_ops.rms_norm_bf16(x, self.attn_norm.weight, self.attn_norm.eps)       # (N, H) bf16
    qkv = attn.qkv_proj(h)                                                            # (N, (nh+2nkv)hd)
    if attn.use_rope:
        cos, sin = rope
        fused_ops.rope_bf16_(qkv, nh + nkv, hd, cos.view(N, hd), sin.view(N, hd))
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    out = kv.attend(depth, q.view(N, nh, hd), k.view(N, nkv, hd), v.view(N, nkv, hd))  # (N, nh, hd)
    a = attn.o_proj(out.reshape(N, nh * hd))                                          # bf16
    x, h = fused_ops.add_rms_norm_bf16(x, a, self.mlp_norm.weight, self.mlp_norm.eps)
    return x.add_(mlp.down_proj(fused_ops.silu_mul_bf16(mlp.gate_up_proj(h))))      # fp32 += bf16


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _install_fused_layers(model: nn.Module) -> None:
    from memlm.models.blocks import MLP, DecoderLayer, RMSNorm
    post_ops = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}
    for mlp in model.modules():            # ungated MLPs (GPT-2): activation in bf16 too
        if isinstance(mlp, MLP) and not mlp.gated and isinstance(mlp.up_proj, Bf16Linear):
            mlp.up_proj.set_out_dtype(torch.bfloat16)
            if mlp.up_proj.packed is not None and model.cfg.activation in post_ops:
                mlp.up_proj.post_op = post_ops[model.cfg.activation]   # fused into the matmul
                mlp.act = _identity
    for layer in model.modules():
        if not (isinstance(layer, DecoderLayer) and layer.mixer_kind == "attention" and layer.has_mlp
                and isinstance(layer.attn_norm, RMSNorm) and isinstance(layer.mlp_norm, RMSNorm)
                and layer.attn.qkv_proj is not None and layer.mlp.gate_up_proj is not None
                and layer.mlp.act is F.silu):
            continue
        layer.attn.o_proj.set_out_dtype(torch.bfloat16)
        layer.mlp.down_proj.set_out_dtype(torch.bfloat16)    # added into the fp32 stream in one pass
        layer.forward = types.MethodType(_fused_layer_forward, layer)


def use_bf16_matmuls(model: nn.Module, pack: bool = True) -> nn.Module:
    """Rewrite `model` in place (see the module docstring); returns it.

    pack: hold CPU weights in oneDNN's packed layout (`prepack`); pass False for a model that
    will move to a GPU (packed tensors are CPU-only and would not move with it).
    """
    cast = _CastCache()
    _fuse_projections(model, cast, pack)
    # Keep only (parent, name) pairs, never the old layers themselves, so each fp32 weight is
    # freed as soon as its bf16 copy exists: peak = fp32 model + one layer, not fp32 + bf16.
    slots = [(m, name) for m in model.modules() for name, child in m.named_children()
             if isinstance(child, (nn.Linear, nn.Embedding))]
    for parent, name in slots:
        child = getattr(parent, name)
        # an untied LM head stays dense (unpacked): `_bf16_logits` gathers its rows
        head = parent is model and name == "lm_head"
        new = (Bf16Linear(child.weight, child.bias, cast, pack=pack and not head)
               if isinstance(child, nn.Linear) else Bf16Embedding(child))
        del child
        setattr(parent, name, new)
    with torch.no_grad():                      # norms, biases, anything else: fp32
        for mod in model.modules():
            if isinstance(mod, (Bf16Linear, Bf16Embedding)):
                continue
            for pname, p in list(mod.named_parameters(recurse=False)):
                if p.dtype != torch.float32:
                    setattr(mod, pname, nn.Parameter(p.detach().float(), requires_grad=False))
    model.compute_logits = types.MethodType(_bf16_logits, model)
    if model.cfg.tie_word_embeddings and pack:
        # The embedding lookup needs the plain table, so a tied head gets a second, packed
        # copy: +2 bytes per vocabulary x hidden (56 MiB for SmolLM2), decode logits ~1.8x faster.
        model.lm_head_packed = prepack(model.embed.weight.detach())
    _install_fused_layers(model)
    return model
