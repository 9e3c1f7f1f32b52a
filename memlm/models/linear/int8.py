"""The int8 weight-only linear method: int8 codes with one scale per output row, bf16 activations.

Owns: holding each projection as `qweight` (out, in') int8 and `scales` (out,) bf16
(`memlm.kernels.quant.quantize_int8`: symmetric, round to nearest) and running it through
torch's `aten._weight_int8pack_mm`. A quarter of fp32's weight bytes, half of bf16's. A GGUF's
Q8_0 tensors (int8 with an fp16 scale per 32 inputs) and K-quant tensors (Q4_K / Q5_K / Q6_K)
are kept as loaded instead (`weight_only.py`, `memlm.kernels.gemv`, `memlm.kernels.kquant`).
Does not know: fusing, biases, the embedding and the LM head (`weight_only.py`, shared with int4).
"""
from __future__ import annotations

import torch

from memlm.kernels import kquant, quant
from memlm.models.linear.base import Linear, register
from memlm.models.linear.weight_only import WeightOnlyMethod


@register
class Int8Method(WeightOnlyMethod):
    name = "int8"
    # GGUF Q8_0 (int8 with a scale per 32), and the K-quants (fewer bits: kept, not requantized)
    block_codecs = table_block_codecs = ("q8_0", *kquant.CODECS)

    def pack(self, layer: Linear, weight: torch.Tensor) -> None:
        self._pack_rows(layer, weight)

    def matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return quant.int8_matmul(x, layer.qweight, layer.scales)

    def codec_bytes(self, out_features: int, in_features: int) -> int:
        return quant.int8_bytes(out_features, in_features, self.act_dtype)

    def codec_dequantize(self, layer: Linear) -> torch.Tensor:
        return quant.dequantize_int8(layer.qweight, layer.scales, layer.in_features)
