"""What the weight-only quantized methods (`int8.py`, `int4.py`) share.

Owns: quantizing each projection as it is processed (its fp32 weight freed as soon as the codes
exist, so converting peaks at the model as loaded plus one layer), fusing q/k/v and gate/up (the
fp32 parts are concatenated, then quantized once), biases and output dtypes, and the token
embedding kept int8 (one scale per row: a lookup dequantizes only the rows it reads), which is
also the tied LM head, run through the int8 kernel (an untied head is quantized the same way).
GGUF blocks a subclass keeps (`block_codecs`, `table_block_codecs`: Q8_0 / Q4_0 / Q4_1, and the
K-quants Q4_K / Q5_K / Q6_K) are held as loaded (`memlm.kernels.gemv.BlockWeight`, or
`memlm.kernels.kquant.KQuantWeight` for K-quants, handed over by the loader as `layer.gguf_blocks`,
never widened to fp32) and run through the native block kernels; a table's lookup dequantizes
only the rows it reads, and the tied head multiplies by the blocks directly (fp32 accumulation,
no top-k refinement needed).
Activations enter the kernels in bf16 and the decoder layers take the fused bf16 path
(`DecoderLayer._forward_fused`), as with bf16 weights; the residual stream stays fp32.
Does not know: a projection codec's layout or kernel — a subclass packs (`pack`), multiplies
(`matmul`) and dequantizes (`codec_dequantize`) its own (`memlm.kernels.quant`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from memlm.kernels import gemv, kquant, quant
from memlm.kernels.cpu import row_bucket
from memlm.memory.budget import release_free_heap
from memlm.models.linear.base import Embedding, Linear, LinearMethod


def _parts(held) -> list:
    return held.parts if isinstance(held, kquant.StackedBlocks) else [held]


def _block_matmul(x: torch.Tensor, held, exact: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, N) in fp32, or in `out_dtype` where the kernel writes it directly (gemv's AMX GEMM)."""
    if isinstance(held, kquant.StackedBlocks):
        return torch.cat([_block_matmul(x, p, exact) for p in held.parts], dim=1)
    if held.codec in kquant.CODECS:
        return kquant.matmul(x, held, exact)
    return gemv.block_matmul(x, held, exact, out_dtype)


def _block_dequantize(held) -> torch.Tensor:
    return torch.cat([kquant.kernels_for(p.codec).dequantize(p) for p in _parts(held)])


class WeightOnlyMethod(LinearMethod):
    """Per layer after processing: the codec's buffers (see the subclass), `weight` None,
    `bias` in `out_dtype`, `out_dtype` (fp32 where y joins the residual stream, bf16 where the
    next consumer is bf16). Per embedding / tied head: `qweight` (V, K') int8 and `scales` (V,)."""

    inner_dtype = torch.bfloat16
    fused_layers = True
    act_dtype = torch.bfloat16        # what the kernels read and write (their scales' dtype)
    block_codecs: tuple[str, ...] = ()         # GGUF codecs a projection keeps as loaded
    table_block_codecs: tuple[str, ...] = ()   # ... and an embedding / LM head

    def __init__(self, device: torch.device | str | None = None):
        super().__init__(device)
        if self.device.type != "cpu":
            raise ValueError(f"{self.name} weights run on the CPU only (torch's CPU kernels): use "
                             f"weight_dtype bf16 on {self.device.type}")

    # ---- the codec (subclasses) ------------------------------------------------------------
    def pack(self, layer: Linear, weight: torch.Tensor) -> None:
        """Quantize fp32 `weight` (out, in) into buffers on `layer`."""
        raise NotImplementedError

    def matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """(M, in) act_dtype -> (M, out) act_dtype through the packed weight."""
        raise NotImplementedError

    def codec_dequantize(self, layer: Linear) -> torch.Tensor:
        """The fp32 (out, in) weight `matmul` multiplies by."""
        raise NotImplementedError

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        """The fp32 (out, in) weight `apply` multiplies by (for tests and inspection)."""
        held = getattr(layer, "block_weight", None)
        return _block_dequantize(held) if held is not None else self.codec_dequantize(layer)

    def keeps_blocks(self, codec: str, table: bool) -> bool:
        return codec in (self.table_block_codecs if table else self.block_codecs)

    def codec_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes `pack` holds for an (out, in) weight."""
        raise NotImplementedError

    def codec_label(self, module, name: str, tensor: torch.Tensor) -> str:
        if name in ("qweight", "scales"):
            return "int8"
        if name == "blocks":
            return module.block_weight.codec
        if name.startswith("blocks_"):                     # a part of `kquant.StackedBlocks`
            return module.block_weight.parts[int(name[len("blocks_"):])].codec
        return super().codec_label(module, name, tensor)

    def stored_bytes(self, shape: tuple[int, ...], table: bool, codec: str | None = None) -> int:
        if len(shape) < 2:
            return math.prod(shape) * 4                          # norms and biases stay fp32
        n, k = shape[0], math.prod(shape[1:])
        if codec is not None and self.keeps_blocks(codec, table):
            return kquant.kernels_for(codec).block_bytes(n, k, codec)
        return quant.int8_bytes(n, k, self.act_dtype) if table else self.codec_bytes(n, k)

    # ---- projections -----------------------------------------------------------------------
    @staticmethod
    def _hold_blocks(module: Linear | Embedding, held: gemv.BlockWeight) -> None:
        if isinstance(held, kquant.StackedBlocks):
            for i, part in enumerate(held.parts):
                module.register_buffer(f"blocks_{i}", part.blocks)
        else:
            module.register_buffer("blocks", held.blocks)
        module.block_weight = held
        module.weight = None

    def _hold(self, layer: Linear, weight: torch.Tensor | None, bias: torch.Tensor | None,
              out_dtype: torch.dtype, blocks: gemv.BlockWeight | None = None) -> None:
        if blocks is not None:
            self._hold_blocks(layer, blocks)
        else:
            self.pack(layer, weight.detach())
        layer.weight = None
        layer.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        layer.out_dtype = out_dtype

    def process_weights_after_loading(self, layer: Linear) -> None:
        self._hold(layer, layer.weight, layer.bias, torch.float32, layer.__dict__.pop("gguf_blocks", None))

    @staticmethod
    def _loaded_fp32(layer: Linear) -> torch.Tensor:
        held = layer.__dict__.pop("gguf_blocks", None)
        return _block_dequantize(held) if held is not None else layer.weight.detach().float()

    def fuse(self, layers: list[Linear]) -> Linear:
        held = [getattr(m, "gguf_blocks", None) for m in layers]
        blocks = None
        if all(h is not None for h in held) and len({h.in_features for h in held}) == 1:
            n, k = sum(h.out_features for h in held), held[0].in_features
            if len({h.codec for h in held}) == 1:      # same GGUF codec: rows concatenated as is
                blocks = type(held[0])(torch.cat([h.blocks for h in held]), held[0].codec, k, n)
            else:                                      # each part kept in its own codec
                blocks = kquant.StackedBlocks(held, k, n)
            for m in layers:
                del m.gguf_blocks
        weight = None if blocks is not None else torch.cat([self._loaded_fp32(m) for m in layers])
        biases = [m.bias for m in layers]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, layers)])
        fused = Linear(0, 0, False, self, init=False)            # holds nothing yet
        shape = (blocks.out_features, blocks.in_features) if blocks is not None else tuple(weight.shape)
        fused.out_features, fused.in_features = shape
        self._hold(fused, weight, bias, self.inner_dtype, blocks)
        return fused

    def set_out_dtype(self, layer: Linear, dtype: torch.dtype) -> None:
        layer.out_dtype = dtype
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        held = getattr(layer, "block_weight", None)
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if held is not None else x2.to(self.act_dtype)                  # (M, K)
        if x2.shape[0] == 0:
            y = x2.new_empty(0, layer.out_features)
        elif held is not None:
            y = _block_matmul(x2, held, out_dtype=layer.out_dtype)             # fp32 or out_dtype
        else:
            y = self.matmul(layer, x2.contiguous())                               # (M, N)
        y = y.to(layer.out_dtype)
        y = y if layer.bias is None else y + layer.bias
        return y.view(*lead, y.shape[-1])

    # ---- embeddings and the LM head: int8 rows ----------------------------------------------
    def _pack_rows(self, module: Linear | Embedding, weight: torch.Tensor) -> None:
        held = module.__dict__.pop("gguf_blocks", None)
        if held is not None:
            self._hold_blocks(module, held)
            return
        w = quant.quantize_int8(weight.detach(), self.act_dtype)
        module.register_buffer("qweight", w.qweight)
        module.register_buffer("scales", w.scales)
        module.weight = None

    def process_embedding(self, emb: Embedding) -> None:
        self._pack_rows(emb, emb.weight)

    def embed(self, emb: Embedding, ids: torch.Tensor) -> torch.Tensor:
        held = getattr(emb, "block_weight", None)
        if held is not None:
            kernels = kquant.kernels_for(held.codec)
            rows = kernels.dequantize_rows(held.blocks[ids.reshape(-1)], held.codec, held.in_features)
            return rows.view(*ids.shape, held.in_features)
        return quant.dequantize_int8(emb.qweight[ids], emb.scales[ids], emb.embedding_dim)

    def process_lm_head(self, head: Linear | Embedding) -> None:
        if isinstance(head, Linear):                  # untied: int8 like a tied one
            self._pack_rows(head, head.weight)
            head.out_dtype = torch.float32

    def logits(self, head: Linear | Embedding, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, vocab) fp32 through the int8 head (bf16 in, bf16-rounded out)."""
        held = getattr(head, "block_weight", None)
        if held is not None:
            return _block_matmul(hidden, held, exact=True)         # fp32 activations: exact argmax
        if hidden.shape[0] == 0:
            return hidden.new_empty(0, head.qweight.shape[0], dtype=torch.float32)
        x = hidden.to(self.act_dtype).contiguous()
        return quant.int8_matmul(x, head.qweight, head.scales).float()

    def warm_up(self, model: nn.Module, max_rows: int, head_rows: int | None = None) -> None:
        """Run every block-held weight shape at every row bucket from `gemv.TILE_MIN_ROWS` up to
        `max_rows` once: the tiled bf16 path keeps oneDNN state per shape (`kernels.cpu.row_bucket`),
        which the memory profile must see as resident. The LM head is warmed as `logits` runs it
        (`exact`: bf16 tiles even where the projections take the 8-bit GEMM, which keeps no state)."""
        head = getattr(model, "lm_head_module", None)
        held = {}
        for m in model.modules():
            w0 = getattr(m, "block_weight", None)
            for w in _parts(w0) if w0 is not None else ():
                held[(w.out_features, w.in_features, w.codec, m is head)] = (w, m is head)
        buckets = sorted({row_bucket(r) for r in range(gemv.TILE_MIN_ROWS, max_rows + 1)})
        with torch.inference_mode():
            for b in buckets:
                for w, exact in held.values():
                    if exact and b > row_bucket(head_rows or max_rows):
                        continue          # rows the head never runs (512: a 55 MiB transient)
                    kquant.kernels_for(w.codec).warm_up(w, b, exact)
                    release_free_heap()   # else each larger shape's temporaries take new pages

    # ---- the model as a whole --------------------------------------------------------------
    def held_outside_parameters(self, model: nn.Module) -> tuple[int, int]:
        """Elements of the quantized weights (their bytes are buffers, counted already)."""
        elements = sum(m.out_features * m.in_features for m in model.modules()
                       if isinstance(m, Linear) and m.weight is None and m.method is self)
        elements += sum(m.num_embeddings * m.embedding_dim for m in model.modules()
                        if isinstance(m, Embedding) and m.weight is None)
        return elements, 0
