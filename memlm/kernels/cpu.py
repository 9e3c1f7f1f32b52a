"""What this CPU can do: the one reader of its feature flags, and the bf16-matmul decision.

Owns: `cpu_flags()` (the `flags` line of /proc/cpuinfo, read once per process) and
`has_vnni()`, `bf16_matmul_is_fast(device)`, which model loading asks before choosing bf16 weights, and
`row_bucket`, the row counts every bf16 matmul is padded to (oneDNN keeps state per shape).
`native.py` keys its build cache on the same flags (a `-march=native` build is only valid on
the CPU it was built for).
Does not know: how kernels are built, or which model is loaded.
"""
from __future__ import annotations

import functools
import time

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (`avx512f`, `amx_bf16`, ...); empty where /proc/cpuinfo is not."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return frozenset()


def has_vnni() -> bool:
    """AVX-512 VNNI with the byte / word instructions (vpdpbusd on zmm): the int8-activation
    block kernels' fast path (`memlm.kernels.gemv.int8_activations`)."""
    flags = cpu_flags()
    return "avx512_vnni" in flags and "avx512bw" in flags


def bf16_matmul_is_fast(device: torch.device) -> bool:
    """True when bf16 matmuls clearly beat fp32 here (CPUs with AMX or AVX512-BF16, all GPUs).

    AMX (`amx_bf16` in /proc/cpuinfo) decides at once: bf16 matmuls measured 3-7x faster than
    fp32 there. Without AMX or AVX512-BF16 bf16 matmul on CPU is ~100x slower: no. In between
    (AVX512-BF16 only; Zen 5 measured 4.3x) a timing decides: both dtypes warmed up, then timed in
    alternation and the best of each kept, so load from other processes hits both alike (a
    best-of-5 of each in turn still chose fp32 about one run in four on a busy 2-core machine).
    bf16 also halves the weights' bytes, so it wins at a 1.5x margin.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True
    if "avx512_bf16" not in flags:
        return False
    x32, w32 = torch.randn(256, 1024), torch.randn(1024, 1024)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for i in range(14):
        for x, w in ((x16, w16), (x32, w32)):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if i >= 2:                          # the first calls create oneDNN's kernels
                best[x.dtype] = min(best[x.dtype], time.perf_counter() - t)
    return best[torch.bfloat16] * 1.5 < best[torch.float32]


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
