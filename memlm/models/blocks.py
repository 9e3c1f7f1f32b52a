"""Layer building blocks: norms, rotary embeddings, attention (MHA/GQA), MLPs, a recurrent
mixer, and the decoder layer that composes a mixer with an MLP.

Owns: the math of one layer. Does not know: where K/V live (it calls `kv.attend`), how
weights were loaded, or which layers share parameters (that is `transformer.py`).
Parameter names here are memlm's checkpoint names; loaders map other formats onto them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.config import ModelConfig


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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, H, bias=cfg.o_bias)
        self.use_rope = cfg.position == "rope"
        # Set by a weight codec (memory/weights.py) that fuses q/k/v into one matmul whose
        # output columns are [q | k | v]; the separate projections are then gone.
        self.qkv_proj: nn.Module | None = None

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


class RecurrentMixer(nn.Module):
    """A gated linear recurrence (minGRU-style) with a fixed-size state per sequence.

        a_t = sigmoid(W_a x_t)           forget gate, per channel
        h_t = a_t * h_{t-1} + (1 - a_t) * W_x x_t
        y_t = W_o (h_t * silu(W_g x_t))

    The state is one vector of `hidden_size` per sequence regardless of length, so a
    recurrent layer needs no KV cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.in_proj = nn.Linear(H, 3 * H, bias=True)   # -> gate logits, candidate, output gate
        self.out_proj = nn.Linear(H, H, bias=False)

    def scan(self, x: torch.Tensor, state: torch.Tensor | None):
        """x (B, T, H), state (B, H) or None -> y (B, T, H), final state (B, H)."""
        B, T, H = x.shape
        a_logit, cand, gate = self.in_proj(x).chunk(3, dim=-1)
        a = torch.sigmoid(a_logit)
        b = (1 - a) * cand                                  # (B, T, H)
        h = x.new_zeros(B, H) if state is None else state
        # Chunked parallel form: inside a chunk h_t = P_t * (h0 + cumsum(b_s / P_s)) with
        # P_t = prod a; chunks of 16 keep 1/P_s well inside fp32 range (a >= sigmoid(-inf)
        # is clamped).
        log_a = torch.log(a.clamp_min(1e-4))
        outs = []
        for s in range(0, T, 16):
            la = log_a[:, s:s + 16].cumsum(dim=1)           # (B, c, H)
            P = la.exp()
            hs = P * (h[:, None, :] + (b[:, s:s + 16] * (-la).exp()).cumsum(dim=1))
            outs.append(hs)
            h = hs[:, -1]
        hseq = torch.cat(outs, dim=1)
        y = self.out_proj(hseq * F.silu(gate))
        return y, h

    def forward(self, x, depth: int, kv, rope=None):
        return kv.recurrent(depth, x, self)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(H, I, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(H, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, H, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)
        self.gate_up_proj: nn.Module | None = None   # fused [gate | up], set by a weight codec

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


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
    """

    def __init__(self, cfg: ModelConfig, mixer: str, depths: tuple[int, ...] = (0,)):
        super().__init__()
        self.mixer_kind = mixer
        self.per_depth = cfg.depth_norms or cfg.depth_gates
        self.slots = {d: s for s, d in enumerate(depths)}   # depth -> slot of per-depth params
        self.depth_norms = cfg.depth_norms
        self.depth_gates = cfg.depth_gates
        n = len(depths) if cfg.depth_norms else 1
        norm = (lambda: DepthNorm(cfg.hidden_size, cfg.norm_eps, n)) if self.per_depth else (lambda: make_norm(cfg))
        self.attn_norm = norm()
        self.attn = MIXER_REGISTRY[mixer](cfg)
        self.has_mlp = cfg.mlp != "none"
        if self.has_mlp:
            self.mlp_norm = norm()
            self.mlp = MLP(cfg)
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

    def forward(self, x, depth: int, kv, rope):
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
