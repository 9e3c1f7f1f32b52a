"""Layer building blocks: norms, rotary embeddings, attention (MHA/GQA), MLPs, and the decoder
layer that composes a mixer (attention, or `recurrent.py`'s) with an MLP.

Owns: the math of one layer, which projections share an input (q/k/v, gate/up: fused into one
matmul when the linear method can) and the decoder layer's two paths, plain and fused.
Does not know: where K/V live (it calls `kv.attend`), how weights are stored or multiplied
(each projection is a `memlm.models.linear.Linear` run by its method), or which layers share
parameters (that is `transformer.py`).
Parameter names here are memlm's checkpoint names; loaders map other formats onto them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.config import ModelConfig
from memlm.kernels import block_layer, dense_layer, fused_ops
from memlm.models.linear import Linear, LinearMethod, default_method
from memlm.models.recurrent import RecurrentMixer

# The native per-layer decode steps, by the weights they run on (a name on the layer, not the
# module itself: layers are deep-copied, and modules cannot be)
_STEP_KERNELS = {"blocks": block_layer, "dense": dense_layer}
# Rows of a step's MLP run at once in the fused path: its (rows, 2 x intermediate) gate|up output
# is a step's largest temporary (fp32 from the block GEMM, then bf16: 9 MiB at 512 SmolLM2 rows,
# 37 MiB at 2048), so longer steps run it in chunks of this many rows, which the matmuls still
# fill (BENCHMARKS.md, sixth round, "The LM head and the MLP's temporaries").
MLP_CHUNK_ROWS = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class DepthNorm(nn.Module):
    """RMSNorm with one weight row per slot: a shared layer's norm at each depth it runs at.

    Deliberately not an `RMSNorm` subclass: the inference engine fuses only layers whose norms
    are `RMSNorm` (one weight per layer), so a layer holding a `DepthNorm` keeps the plain
    `DecoderLayer.forward`, which knows the depth.
    """

    def __init__(self, dim: int, eps: float, slots: int):
        super().__init__()
        self.eps = eps
        self.weights = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(slots))

    def forward(self, x, slot: int):
        return F.rms_norm(x, (x.shape[-1],), self.weights[slot], self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def activation(name: str):
    return {
        "silu": F.silu,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }[name]


class Rotary:
    """Rotary position embedding in the Hugging Face "rotate half" layout."""

    def __init__(self, head_dim: int, theta: float):
        # Explicitly on the CPU: a model built under `torch.device("meta")` (the loaders do that to
        # skip random init) must still get real frequencies. cos_sin moves them where needed.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) -> cos, sin each (N, 1, head_dim), broadcastable over heads."""
        freqs = positions.to(torch.float64)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, hd)
        return emb.cos().float()[:, None, :], emb.sin().float()[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (N, heads, hd) rotated by position."""
        half = x.shape[-1] // 2
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, method: LinearMethod | None = None, init: bool = True):
        super().__init__()
        method = method or default_method()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = Linear(H, self.n_heads * self.hd, cfg.qkv_bias, method, init)
        self.k_proj = Linear(H, self.n_kv * self.hd, cfg.qkv_bias, method, init)
        self.v_proj = Linear(H, self.n_kv * self.hd, cfg.qkv_bias, method, init)
        self.o_proj = Linear(self.n_heads * self.hd, H, cfg.o_bias, method, init)
        self.use_rope = cfg.position == "rope"
        # One matmul whose output columns are [q | k | v], made by `process_weights` when the
        # linear method fuses; the separate projections are then gone.
        self.qkv_proj: Linear | None = None

    def process_weights(self, method: LinearMethod) -> None:
        """After loading: fuse q/k/v into `qkv_proj` if `method` can (`DecoderLayer.process_weights`
        converts the projections left)."""
        fused = method.fuse([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, depth: int, kv, rope: tuple | None):
        N = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.hd, self.n_kv * self.hd,
                                              self.n_kv * self.hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(N, self.n_heads, self.hd)   # (N, nh, hd)
        k = k.view(N, self.n_kv, self.hd)      # (N, nkv, hd)
        v = v.view(N, self.n_kv, self.hd)
        if self.use_rope:
            cos, sin = rope
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        out = kv.attend(depth, q, k, v)  # (N, nh, hd)
        return self.o_proj(out.reshape(N, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, method: LinearMethod | None = None, init: bool = True):
        super().__init__()
        method = method or default_method()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = Linear(H, I, cfg.mlp_bias, method, init)
        self.up_proj = Linear(H, I, cfg.mlp_bias, method, init)
        self.down_proj = Linear(I, H, cfg.mlp_bias, method, init)
        self.activation = cfg.activation
        self.act = activation(cfg.activation)
        self.gate_up_proj: Linear | None = None   # fused [gate | up], made by `process_weights`
        self.act_in_up_proj = False               # the activation runs inside up_proj's matmul

    def process_weights(self, method: LinearMethod) -> None:
        """After loading: fuse gate/up if `method` can; an ungated MLP's inner activation runs in
        the method's inner dtype, inside the up projection's matmul where the method can."""
        if self.gated:
            fused = method.fuse([self.gate_proj, self.up_proj])
            if fused is not None:
                self.gate_up_proj = fused
                del self.gate_proj, self.up_proj
        else:
            self.up_proj.process(method)
            self.up_proj.set_out_dtype(method.inner_dtype)
            self.act_in_up_proj = method.fuse_activation(self.up_proj, self.activation)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        h = self.up_proj(x)
        return self.down_proj(h if self.act_in_up_proj else self.act(h))


MIXER_REGISTRY = {"attention": Attention, "recurrent": RecurrentMixer}


class DecoderLayer(nn.Module):
    """Pre-norm residual layer: x + mixer(norm(x)), then x + mlp(norm(x)).

    A layer run at several depths (`depths`, from `cfg.layer_order`) can keep a few parameters
    per depth, picked by the depth's slot s (its index in `depths`):

        x = x + g_a[s] * mixer(norm_a[s](x));   x = x + g_m[s] * mlp(norm_m[s](x))

        cfg.depth_norms  norm_*[s]: one RMSNorm weight row per slot (else one row for all slots)
        cfg.depth_gates  g_*[s]: learned scalars, initialised to 1 (else the constant 1)

    With either option the norms are `DepthNorm`s (so the engine never fuses the layer); without
    both the layer holds plain `RMSNorm`s and runs the unchanged pre-norm forward.

    Two paths, chosen once by `process_weights` (`self.fused`): the plain forward above, or
    `_forward_fused` — the same math for an RMSNorm / attention / SwiGLU layer whose linear
    method fuses layers (bf16): norms, RoPE and SwiGLU in single bf16 passes (`fused_ops`).
    A fused layer whose projections all hold GGUF blocks (or plain bf16 weights the method runs
    natively, `native_decode`) also has `block_step`: steps of at most `MAX_ROWS` rows of its
    kernels (`block_layer` / `dense_layer`) then run `_forward_blocks`, two native calls around
    attention.
    """

    def __init__(self, cfg: ModelConfig, mixer: str, depths: tuple[int, ...] = (0,),
                 method: LinearMethod | None = None, init: bool = True):
        super().__init__()
        method = method or default_method()
        self.mixer_kind = mixer
        self.per_depth = cfg.depth_norms or cfg.depth_gates
        self.slots = {d: s for s, d in enumerate(depths)}   # depth -> slot of per-depth params
        self.depth_norms = cfg.depth_norms
        self.depth_gates = cfg.depth_gates
        n = len(depths) if cfg.depth_norms else 1
        norm = (lambda: DepthNorm(cfg.hidden_size, cfg.norm_eps, n)) if self.per_depth else (lambda: make_norm(cfg))
        self.attn_norm = norm()
        self.attn = MIXER_REGISTRY[mixer](cfg, method, init)
        self.has_mlp = cfg.mlp != "none"
        if self.has_mlp:
            self.mlp_norm = norm()
            self.mlp = MLP(cfg, method, init)
        self.fused = False                       # forward takes `_forward_fused`
        self.block_step = False                  # ... and `_forward_blocks` for small batches
        self._layer_args = None                  # ... in one native call (`block_layer.LayerArgs`)
        self._step_kind = "blocks"               # ... through these `_STEP_KERNELS` (or "dense")
        if cfg.depth_gates:
            self.attn_gate = nn.Parameter(torch.ones(len(depths)))   # (slots,)
            if self.has_mlp:
                self.mlp_gate = nn.Parameter(torch.ones(len(depths)))

    def per_depth_parameter_names(self) -> list[str]:
        """Local names of parameters that act at one depth each, even when the layer is shared."""
        names = []
        if self.depth_norms:
            norms = ("attn_norm", "mlp_norm") if self.has_mlp else ("attn_norm",)
            names += [f"{n}.weights.{i}" for n in norms for i in range(len(self.slots))]
        if self.depth_gates:
            names += ["attn_gate", "mlp_gate"] if self.has_mlp else ["attn_gate"]
        return names

    def process_weights(self, method: LinearMethod) -> None:
        """After loading: fuse and convert every projection to `method`, then pick the path."""
        self.attn.process_weights(method)
        if self.has_mlp:
            self.mlp.process_weights(method)
        for mod in self.modules():
            if isinstance(mod, Linear) and mod.method is not method:
                mod.process(method)
        self.fused = (method.fused_layers and self.mixer_kind == "attention" and self.has_mlp
                      and isinstance(self.attn_norm, RMSNorm) and isinstance(self.mlp_norm, RMSNorm)
                      and self.attn.qkv_proj is not None and self.mlp.gate_up_proj is not None
                      and self.mlp.activation == "silu")
        if self.fused:
            self.attn.o_proj.set_out_dtype(method.inner_dtype)
            self.mlp.down_proj.set_out_dtype(method.inner_dtype)   # added into the fp32 stream in one pass
            self._pick_block_step(method)

    def _pick_block_step(self, method: LinearMethod) -> None:
        """Small batches go through two native calls per layer (`_forward_blocks`) when only q|k|v
        has a bias and every projection holds GGUF blocks of whole 32-wide groups (`block_layer`)
        or a plain bf16 weight of a method with `native_decode` (`dense_layer`)."""
        attn, mlp = self.attn, self.mlp
        projs = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        held = [getattr(p, "block_weight", None) for p in projs]
        self._step_kind, self._layer_args = "blocks", None
        if getattr(method, "native_decode", False) and all(
                p.weight is not None and p.weight.dtype == torch.bfloat16 for p in projs):
            held, self._step_kind = [p.weight.detach() for p in projs], "dense"
        elif not (all(h is not None for h in held) and block_layer.weights_fit(*held)):
            held = None
        self.block_step = held is not None and all(p.bias is None for p in projs[1:])
        if self.block_step:     # read once per step: module attribute lookups cost ~1 us each
            bias = attn.qkv_proj.bias
            norms = [(n.weight.detach().float().contiguous(), n.eps) for n in (self.attn_norm, self.mlp_norm)]
            self._block_args = (attn.n_heads, attn.n_kv, attn.hd, attn.use_rope, *norms[0], held[0],
                                None if bias is None else bias.detach().float().contiguous(), *norms[1],
                                *held[1:])
            # the whole layer in one native call (`Transformer.forward`, `block_layer.decode_layers`)
            self._layer_args = _STEP_KERNELS[self._step_kind].layer_args(
                *self._block_args[4:], attn.n_heads, attn.n_kv, attn.hd, attn.use_rope)

    def forward(self, x, depth: int, kv, rope):
        if self.block_step and x.device.type == "cpu" and _STEP_KERNELS[self._step_kind].usable(x.shape[0]):
            return self._forward_blocks(x, depth, kv, rope)
        if self.fused:
            return self._forward_fused(x, depth, kv, rope)
        if self.per_depth:
            return self._forward_per_depth(x, depth, kv, rope)
        x = x + self.attn(self.attn_norm(x), depth, kv, rope)
        if self.has_mlp:
            x = x + self.mlp(self.mlp_norm(x))
        return x

    def _forward_per_depth(self, x, depth: int, kv, rope):
        s = self.slots[depth]
        n = s if self.depth_norms else 0
        h = self.attn(self.attn_norm(x, n), depth, kv, rope)
        x = x + (self.attn_gate[s] * h if self.depth_gates else h)
        if self.has_mlp:
            h = self.mlp(self.mlp_norm(x, n))
            x = x + (self.mlp_gate[s] * h if self.depth_gates else h)
        return x

    def _forward_fused(self, x, depth: int, kv, rope):
        """`forward` with fused projections: bf16 between the norms and the matmuls, the
        residual stream fp32 (see `memlm.models.linear.bf16`)."""
        attn, mlp = self.attn, self.mlp
        N, nh, nkv, hd = x.shape[0], attn.n_heads, attn.n_kv, attn.hd
        x = x.contiguous()
        h = fused_ops.rms_norm_bf16(x, self.attn_norm.weight, self.attn_norm.eps)      # (N, H) bf16
        qkv = attn.qkv_proj(h)                                                           # (N, (nh+2nkv)hd)
        if attn.use_rope:
            cos, sin = rope
            fused_ops.rope_bf16_(qkv, nh + nkv, hd, cos.view(N, hd), sin.view(N, hd))
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        out = kv.attend(depth, q.view(N, nh, hd), k.view(N, nkv, hd), v.view(N, nkv, hd))  # (N, nh, hd)
        a = attn.o_proj(out.reshape(N, nh * hd))                                         # bf16
        x, h = fused_ops.add_rms_norm_bf16(x, a, self.mlp_norm.weight, self.mlp_norm.eps)
        for r in range(0, N, MLP_CHUNK_ROWS):
            rows = slice(r, r + MLP_CHUNK_ROWS)
            x[rows].add_(mlp.down_proj(fused_ops.silu_mul_bf16(mlp.gate_up_proj(h[rows]))))  # fp32 += bf16
        return x

    def _forward_blocks(self, x, depth: int, kv, rope):
        """`_forward_fused` for a few rows on block weights: norm, q|k|v and RoPE in one native call,
        attention, then o_proj, residual, norm, gate|up, SwiGLU, down and residual in another
        (`memlm.kernels.block_layer`: 8-bit activations; `dense_layer`: bf16; fp32 residual stream)."""
        (nh, nkv, hd, use_rope, an_w, an_eps, qkv_w, qkv_b, mn_w, mn_eps, o_w, gu_w, d_w) = self._block_args
        kernels = _STEP_KERNELS[self._step_kind]
        N = x.shape[0]
        x = x.float().clone(memory_format=torch.contiguous_format)   # updated in place below
        cos = sin = None
        if use_rope:
            cos, sin = (t.reshape(N, hd).contiguous() for t in rope)
        qkv = kernels.attn_in(x, an_w, an_eps, qkv_w, qkv_b, cos, sin, nh + nkv, hd)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        out = kv.attend(depth, q.view(N, nh, hd), k.view(N, nkv, hd), v.view(N, nkv, hd))
        a = out.reshape(N, nh * hd).to(torch.bfloat16).contiguous()
        return kernels.attn_out_mlp_(x, a, mn_w, mn_eps, o_w, gu_w, d_w)
