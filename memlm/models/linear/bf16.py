"""The bf16 linear method: bf16 weights and matmuls, fp32 residual stream.

Owns: bf16 storage of every projection and embedding table, oneDNN prepacking on CPU, the
fused q/k/v and gate/up projections (one matmul each), the padded row buckets that bound
oneDNN's per-shape state, and the LM head whose top logits are recomputed in fp32.
What stays fp32: the residual stream, norms, decode attention and sampling (a bf16 residual
stream is what hurts small models). What runs in bf16: the matmuls, the q/k/v heads between
their projection and attention (RoPE, prefill attention; the KV cache is fp16 anyway) and the
MLP's inner activation; each is rounded to bf16 once, where a bf16 matmul would round it anyway.
Halves weight memory and removes most fp32<->bf16 copies; on CPUs with AMX bf16 matmuls run
~5x faster than fp32 (measured by `memlm.kernels.bf16_matmul_is_fast`).
With MEMLM_BF16_DECODE=auto on CPUs without AMX (or =1), where the native bf16 decode kernels
build (`native_decode`), weights stay plain (N, K) bf16, unpacked: decode steps of up to `dense_layer.MAX_ROWS` rows run
`memlm.kernels.dense_layer` (the fused decoder steps, each projection `matmul`, and the LM head
in fp32 `head`, exact without refinement), larger ones oneDNN's matmul on the plain weight.
Does not know: which projections share an input or where the residual stream is — the blocks
ask (`fuse`, `set_out_dtype`); the fused layer forward is `DecoderLayer._forward_fused`.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.kernels import dense_layer, fused_ops
from memlm.kernels.cpu import cpu_flags, row_bucket
from memlm.memory.budget import release_free_heap
from memlm.models.linear.base import Embedding, Linear, LinearMethod, register

REFINE_TOP = 16   # logits recomputed exactly (fp32) per row, see Bf16Method.logits


def native_decode_enabled(small_batches: bool = False) -> bool:
    """Whether small CPU steps run `dense_layer`'s native bf16 kernels on plain weights:
    MEMLM_BF16_DECODE=0 (oneDNN's packed weights), auto (on CPUs without AMX) or 1 (wherever the
    kernels build); unset (the default): `small_batches`, which `LLM` sets when its engine never
    holds more than `dense_layer.MAX_ROWS` sequences (`max_num_seqs`), so every decode step takes
    the native whole-layer call. Measured on SmolLM2: a single stream decodes at 1.22-1.24x
    llama.cpp's F16 natively against 0.56x packed (Xeon with AMX, 2026-12-03, eighth round) and
    holds 257 instead of 311 MiB (the tied head is not kept a second time, packed), but larger
    batches run oneDNN on unpacked weights: the 128-request workload's batched decode probe fell
    from 926 to 558 tok/s and the workload from 277 to 259 tok/s (AMD EPYC, fifth round), so
    engines that batch keep the packed weights."""
    env = os.environ.get("MEMLM_BF16_DECODE")
    if env is None:
        return small_batches
    if env not in ("auto", "0", "1"):
        raise ValueError(f"MEMLM_BF16_DECODE={env!r}: use 0 (packed oneDNN), auto (native decode "
                         "without AMX) or 1 (always)")
    return env == "1" or (env == "auto" and "amx_bf16" not in cpu_flags())


# oneDNN post-op (name, algorithm) per activation, run inside a packed matmul's output pass
POST_OPS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def _padded_bf16(x: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (row_bucket(M), K) bf16, zero rows appended."""
    m = x.shape[0]
    xb = x.to(torch.bfloat16)
    pad = row_bucket(m) - m
    return F.pad(xb, (0, 0, 0, pad)) if pad else xb


class CastCache:
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


@register
class Bf16Method(LinearMethod):
    """Per layer after processing: `weight` (bf16 Parameter) or `packed` (oneDNN layout; only
    one copy is kept), `bias` in `out_dtype`, `out_dtype` (fp32 where y joins the residual
    stream, bf16 where the next consumer is bf16 anyway), `post_op` (packed bf16 output only).

    native_decode: small steps run `dense_layer`'s kernels on plain weights (see
    `native_decode_enabled`: by default for `small_batches`, an engine of at most
    `dense_layer.MAX_ROWS` sequences, where decode_bf16.c builds).
    pack: hold CPU weights in oneDNN's packed layout (without `native_decode`); off for a model
    bound for a GPU (packed tensors are CPU-only and would not move with it).
    """

    name = "bf16"
    inner_dtype = torch.bfloat16
    fused_layers = True
    options = ("small_batches",)

    def __init__(self, device: torch.device | str | None = None, small_batches: bool = False):
        super().__init__(device)
        self.native_decode = (self.device.type == "cpu" and native_decode_enabled(small_batches)
                              and dense_layer.available())
        self.pack = self.device.type == "cpu" and not self.native_decode
        self.cast = CastCache()              # one per model: its projections share inputs

    # ---- projections -----------------------------------------------------------------------
    def _hold(self, layer: Linear, weight: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype, pack: bool) -> None:
        dense = weight.detach().to(torch.bfloat16)
        layer.packed = prepack(dense) if pack else None
        layer.weight = None if layer.packed is not None else nn.Parameter(dense, requires_grad=False)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        layer.out_dtype = out_dtype
        layer.post_op = ("none", "")

    def process_weights_after_loading(self, layer: Linear) -> None:
        self._hold(layer, layer.weight, layer.bias, torch.float32, self.pack)

    def fuse(self, layers: list[Linear]) -> Linear:
        weight = torch.cat([m.weight.detach().to(torch.bfloat16) for m in layers])
        biases = [m.bias for m in layers]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(m.out_features, device=m.weight.device)
             for b, m in zip(biases, layers)])
        fused = Linear(0, 0, False, self, init=False)            # holds nothing yet
        fused.in_features, fused.out_features = weight.shape[1], weight.shape[0]
        self._hold(fused, weight, bias, self.inner_dtype, self.pack)
        return fused

    def set_out_dtype(self, layer: Linear, dtype: torch.dtype) -> None:
        layer.out_dtype = dtype
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)

    def fuse_activation(self, layer: Linear, activation: str) -> bool:
        if layer.packed is None or layer.out_dtype != torch.bfloat16 or activation not in POST_OPS:
            return False
        layer.post_op = POST_OPS[activation]
        return True

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])                                           # (M, K)
        if self.native_decode and layer.weight is not None and 0 < x2.shape[0] <= dense_layer.MAX_ROWS:
            y = dense_layer.matmul(x2, layer.weight)                             # (M, N) fp32
            y = (y if layer.bias is None else y + layer.bias.float()).to(layer.out_dtype)
            return y.view(*lead, y.shape[-1])
        xb = self.cast(x2)
        if layer.packed is not None and layer.out_dtype == torch.bfloat16:
            # bias and activation ride in the matmul as oneDNN post-ops: one pass over y
            y = torch.ops.mkldnn._linear_pointwise(xb, layer.packed, layer.bias, layer.post_op[0], [],
                                                   layer.post_op[1])[:x2.shape[0]]
            return y.view(*lead, y.shape[-1])
        y = (F.linear(xb, layer.weight) if layer.packed is None
             else torch.ops.mkldnn._linear_pointwise(xb, layer.packed, None, "none", [], ""))
        y = y[:x2.shape[0]].to(layer.out_dtype)                                  # (M, N)
        y = y if layer.bias is None else y + layer.bias
        return y.view(*lead, y.shape[-1])

    # ---- embeddings and the LM head --------------------------------------------------------
    def process_embedding(self, emb: Embedding) -> None:
        emb.weight = nn.Parameter(emb.weight.detach().to(torch.bfloat16), requires_grad=False)
        emb.head_packed = None

    def embed(self, emb: Embedding, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, emb.weight).float()

    def process_lm_head(self, head: Linear | Embedding) -> None:
        if isinstance(head, Linear):
            # an untied head stays dense (unpacked): `logits` gathers its rows
            self._hold(head, head.weight, head.bias, torch.float32, pack=False)
        elif self.pack:
            # The lookup needs the plain table, so a tied head gets a second, packed copy:
            # +2 bytes per vocabulary x hidden (56 MiB for SmolLM2), decode logits ~1.8x faster.
            head.head_packed = prepack(head.weight.detach())

    def logits(self, head: Linear | Embedding, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) fp32 -> (n, vocab) fp32 logits through the bf16 LM head.

        The bf16 matmul rounds its *output* to bf16: at logit ~16 that is a 0.125 step, enough
        to tie candidates fp32 keeps 0.08 apart (it flipped SmolLM2's first answer token). So
        the REFINE_TOP largest logits of each row are recomputed in fp32 from the unrounded
        hidden state and the (bf16-exact) head rows; the tail keeps bf16 resolution. With
        `native_decode`, up to `dense_layer.MAX_ROWS` rows take `dense_layer.head`: every logit
        in fp32 from the unrounded hidden state (nothing to refine).
        """
        if self.native_decode and 0 < hidden.shape[0] <= dense_layer.MAX_ROWS and head.weight is not None:
            y = dense_layer.head(hidden, head.weight)
            bias = head.bias if isinstance(head, Linear) else None
            return y if bias is None else y + bias.float()
        if isinstance(head, Linear):                              # untied head: its own layer
            y, bias = head(hidden), head.bias
        else:
            x = _padded_bf16(hidden)
            packed = getattr(head, "head_packed", None)
            y = (F.linear(x, head.weight) if packed is None
                 else torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            y, bias = y[:hidden.shape[0]], None
        return fused_ops.bf16_logits_refine(y, hidden.float().contiguous(), head.weight, REFINE_TOP, bias)

    # ---- the model as a whole --------------------------------------------------------------
    def process_model(self, model: nn.Module) -> None:
        with torch.no_grad():                      # norms, biases, anything else: fp32
            for mod in model.modules():
                if isinstance(mod, (Linear, Embedding)):
                    continue
                for pname, p in list(mod.named_parameters(recurse=False)):
                    if p.dtype != torch.float32:
                        setattr(mod, pname, nn.Parameter(p.detach().float(), requires_grad=False))

    def warm_up(self, model: nn.Module, max_rows: int, head_rows: int | None = None) -> None:
        """Run every bf16 weight shape at every row bucket up to `max_rows` once (see row_bucket)."""
        layers = {(m.out_features, m.in_features, m.packed is None): m for m in model.modules()
                  if isinstance(m, Linear) and m.method is self}
        head = model.lm_head_weight
        has_head = head.dtype == torch.bfloat16
        if not layers and not has_head:
            return
        buckets = sorted({row_bucket(m) for m in range(1, max_rows + 1)})
        with torch.inference_mode():
            for b in buckets:
                for m in layers.values():
                    m(torch.zeros(b, m.in_features, dtype=torch.bfloat16))
                if has_head and b <= row_bucket(head_rows or max_rows):
                    model.compute_logits(torch.zeros(b, head.shape[1]))
                release_free_heap()   # else each larger bucket's temporaries take new pages

    def stored_bytes(self, shape: tuple[int, ...], table: bool, codec: str | None = None) -> int:
        return math.prod(shape) * (2 if len(shape) >= 2 else 4)      # norms and biases stay fp32

    def held_outside_parameters(self, model: nn.Module) -> tuple[int, int]:
        elements = sum(m.out_features * m.in_features for m in model.modules()
                       if isinstance(m, Linear) and m.method is self and m.packed is not None)
        extra = sum(m.weight.numel() * 2 for m in model.modules()   # a tied head's packed copy
                    if isinstance(m, Embedding) and getattr(m, "head_packed", None) is not None)
        return elements, elements * 2 + extra
