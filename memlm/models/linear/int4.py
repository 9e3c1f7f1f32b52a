"""The 4-bit weight-only linear method: asymmetric codes per group of inputs, bf16 activations.

Owns: holding each projection in torch's packed 4-bit CPU layout (`packed`, uint8) with one
(scale, zero) per output row and group of `group_size` inputs (`scales_zeros`, bf16;
`memlm.kernels.quant.quantize_int4`: round to nearest), run through
`aten._weight_int4pack_mm_for_cpu`. Group 32 (the default) costs 5 bits per weight with its
scales, group 128 4.25. The embedding and the LM head stay int8 (`weight_only.py`): a lookup
reads rows, which the tiled 4-bit layout does not give, and the head is where 4 bits cost the
most quality. A GGUF's Q4_0 / Q4_1 projections (groups of 32) are kept as loaded at group
size 32, as are its K-quant (Q4_K / Q5_K / Q6_K) projections, and its Q8_0 / Q4_x / K-quant tables
(`weight_only.py`, `memlm.kernels.gemv`, `memlm.kernels.kquant`).
Does not know: fusing, biases, the embedding and the LM head (`weight_only.py`).
"""
from __future__ import annotations

import torch

from memlm.kernels import gemv, kquant, quant
from memlm.models.linear.base import Linear, register
from memlm.models.linear.weight_only import WeightOnlyMethod

DEFAULT_GROUP_SIZE = quant.INT4_DEFAULT_GROUP


@register
class Int4Method(WeightOnlyMethod):
    """group_size: inputs per (scale, zero), one of `quant.INT4_GROUP_SIZES`."""

    name = "int4"
    options = ("group_size",)
    block_codecs = ("q4_0", "q4_1", *kquant.CODECS)    # GGUF 4-bit groups of 32 and K-quants, as loaded
    table_block_codecs = ("q8_0", "q4_0", "q4_1", *kquant.CODECS)

    def __init__(self, device: torch.device | str | None = None, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__(device)
        self.group_size = quant.check_group_size(group_size)

    def keeps_blocks(self, codec: str, table: bool) -> bool:
        """GGUF 4-bit and K-quant blocks are kept for projections at group size 32 (the default)
        only: another group size asks for torch's 4-bit layout."""
        return super().keeps_blocks(codec, table) and (table or self.group_size == gemv.QK)

    def pack(self, layer: Linear, weight: torch.Tensor) -> None:
        w = quant.quantize_int4(weight, self.group_size, self.act_dtype)
        layer.register_buffer("packed", w.packed)
        layer.register_buffer("scales_zeros", w.scales_zeros)
        layer.group_size = self.group_size

    def matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return quant.int4_matmul(x, layer.packed, layer.scales_zeros, layer.group_size, layer.out_features)

    def codec_label(self, module, name: str, tensor: torch.Tensor) -> str:
        if name in ("packed", "scales_zeros"):
            return f"int4 g{module.group_size}"
        return super().codec_label(module, name, tensor)

    def codec_bytes(self, out_features: int, in_features: int) -> int:
        return quant.int4_bytes(out_features, in_features, self.group_size, self.act_dtype)

    def codec_dequantize(self, layer: Linear) -> torch.Tensor:
        """Read back through the kernel (the tiled layout is torch's): fp32 identity rows in, the
        weight out, exactly (bf16 scales are exact in fp32)."""
        eye = torch.eye(layer.in_features)
        y = quant.int4_matmul(eye, layer.packed, layer.scales_zeros.float(), layer.group_size, layer.out_features)
        return y.t().contiguous()
