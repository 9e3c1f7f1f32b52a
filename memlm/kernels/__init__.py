"""memlm's native CPU kernels: C sources in `csrc/`, built on first use, each with a torch fallback.

Owns: `native` (build, cache, the MEMLM_NATIVE switch), `cpu` (the CPU feature probe and
`bf16_matmul_is_fast`), the wrappers `attention` (paged decode attention), `attention_kivi`
(the same over int4 / int2 KIVI blocks) and `fused_ops` (norms, RoPE, SwiGLU, bf16 logits,
argmax), and `quant` (the int8 / 4-bit weight codecs and
torch's CPU kernels that read them).
Does not know: models, KV block ownership, or scheduling.
"""
from memlm.kernels.cpu import bf16_matmul_is_fast, cpu_flags

__all__ = ["bf16_matmul_is_fast", "cpu_flags"]
