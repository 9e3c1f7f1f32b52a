"""The int8 weight-only linear method: float projections quantized on load to Q8_0 blocks (int8
codes with an fp16 scale per 32 inputs, llama.cpp's layout, `gemv.quantize_q8_0`), run by the
native block kernels (`memlm.kernels.gemv`, the fused decode steps); the token embedding and the
LM head keep one int8 scale per row (`weight_only.py`, `memlm.kernels.quant`). A GGUF's Q8_0
tensors and K-quant tensors (Q4_K / Q5_K / Q6_K) are kept as loaded. Without the native kernels
(`MEMLM_NATIVE=0`) the blocks run through their torch reference.
Per-row int8 projections (`aten._weight_int8pack_mm`) decoded a single stream of SmolLM2 at 38
tok/s where the Q8_0 blocks decode at 76-87 (Xeon VM, 2026-12-03, BENCHMARKS.md eighth round).
Does not know: fusing, biases, the embedding and the LM head (`weight_only.py`, shared with int4).
"""
from __future__ import annotations

import torch

from memlm.kernels import gemv, kquant
from memlm.models.linear.base import Linear, register
from memlm.models.linear.weight_only import WeightOnlyMethod


@register
class Int8Method(WeightOnlyMethod):
    name = "int8"
    # GGUF Q8_0 (int8 with a scale per 32), and the K-quants (fewer bits: kept, not requantized)
    block_codecs = table_block_codecs = ("q8_0", *kquant.CODECS)

    def pack(self, layer: Linear, weight: torch.Tensor) -> None:
        self._hold_blocks(layer, gemv.quantize_q8_0(weight))

    def codec_bytes(self, out_features: int, in_features: int) -> int:
        return gemv.block_bytes(out_features, in_features, "q8_0")
