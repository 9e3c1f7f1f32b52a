"""ggml block-quantized weights (Q8_0, Q4_0, Q4_1) kept as GGUF stores them, and their matmul.

Owns: `BlockWeight` (N rows of K/32 blocks, the bytes of a GGUF tensor), their sizes, the exact
torch dequantization (the reference the native kernel is tested against, the fallback when
`MEMLM_NATIVE=0`, and the row lookup of an embedding), quantizing fp32 into a block codec
(through `gguf.quants`, bit-exact with llama.cpp's), and `block_matmul`, which runs
`csrc/gemv_q.c` (reads the blocks directly; fp32 activations and accumulation), or on CPUs with
AVX-512 VNNI 8-bit activations (quantized per row and block of 32 once per call, integer dot
products; `int8_activations()` decides): `csrc/decode_q.c` for a few rows, `csrc/gemm_q.c` from
GEMM_MIN_ROWS rows on (each weight block decoded once per call and chunk of rows and reused over
all of them); or bf16 tiles of W through torch's bf16 GEMM (large M without the 8-bit path, and
the `exact` LM head); or, without the native library, dequantizes and multiplies in fp32.

Workspace outside torch (allocated per call, freed before it returns): the bf16 tile, at most
TILE_ELEMENTS x 2 bytes (8 MiB); `gemm_q.c`'s 8-bit activations of at most GEMM_CHUNK_BYTES
(2 MiB) worth of rows at a time plus 12 bytes per row and block, and one decoded 32-column
panel per thread (40 K bytes: 60 KiB at K = 1536), under 3 MiB for SmolLM2 at 2 threads.

    Q8_0  {fp16 d; int8 q[32]}            34 B / 32 weights   w = d q
    Q4_0  {fp16 d; uint8 qs[16]}          18 B / 32 weights   w = d (q - 8)
    Q4_1  {fp16 d; fp16 m; uint8 qs[16]}  20 B / 32 weights   w = d q + m
    (4-bit: qs[j] & 15 is element j of the block, qs[j] >> 4 element j + 16)

K not a multiple of 32 (weights quantized here, never a GGUF file's) is padded with zero
weights, and x with zero columns. Does not know: layers or which method holds which codec
(`memlm.models.linear.weight_only`), or GGUF files (`memlm.loading.gguf`).
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from memlm.kernels import native
from memlm.kernels.cpu import has_vnni, row_bucket

QK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
CODECS = tuple(BLOCK_BYTES)
GGML_TYPE_IDS = {"q4_0": 2, "q4_1": 3, "q8_0": 8}      # ggml's enum, also the kernel's `type`

_P, _I = ctypes.c_void_p, ctypes.c_int
_LIBRARY = native.Library("gemv_q", "gemv_q.c", {
    "gemv_q": [_I, _P, _P, _P, _I, _I, _I],
    "stream_sum": [_P, ctypes.c_int64, _P],
    "dequant_q_bf16": [_I, _P, _P, _I, _I],
})
# int8-activation kernels and the fused block-weight decoder steps (`memlm.kernels.block_layer`)
DECODE_LIBRARY = native.Library("decode_q", "decode_q.c", {
    "qmatmul": [_I, _P, _P, _P, _I, _I, _I],
    "block_attn_in": [_P, _P, ctypes.c_float, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I],
    "block_attn_out_mlp": [_P, _P, _P, ctypes.c_float, _I, _P, _I, _P, _I, _P, _I, _I, _I, _I],
    "block_layer_step": [_P, _P, _P, _P, _I, _P, _P, _I, _P, _P, _P, _I, _I, _P],
})
# the blocked 8-bit-activation GEMM (prefill chunks and large batches)
GEMM_LIBRARY = native.Library("gemm_q", "gemm_q.c", {"qgemm": [_I, _P, _P, _P, _I, _I, _I, _I, ctypes.c_float, _P]})
# the same on AMX bf16 tiles (CPUs with AMX; `amx_gemm`)
AMX_LIBRARY = native.Library("gemm_amx", "gemm_amx.c", {"amx_gemm": [_I, _P, _P, _P, _I, _I, _I, _I, _P],
                                                         "amx_ready": [_P]})
# From this many rows of x on, W is dequantized to bf16 tile by tile and multiplied by the bf16
# GEMM (each weight reused over all rows, bf16 rounding like the bf16 method's batched path)
# instead of decoding blocks once per 8 rows: measured on SmolLM2's four projection shapes (AMD
# EPYC Zen 5, 2 threads, AVX-512 tile dequantization; 2026-12-02 05:51 UTC) the tiles tie the fp32
# block kernel at 12 rows, beat it 1.3x at 16, 2.2x at 24 and 3.2x at 32; the 8-bit kernel keeps
# up to 8 rows (0.35 vs 0.45 ms at 8 rows).
TILE_MIN_ROWS = 16
INT8_MAX_ROWS = 8               # decode_q.c's qmatmul: 8-bit activations up to this many rows
# From this many rows on, where `int8_activations()`, the blocked GEMM (gemm_q.c) replaces both
# qmatmul and the bf16 tiles, up to GEMM_AUTO_MAX_ROWS rows by default (`int8_gemm`). Measured
# (`benchmarks/weight_kernels.py --rows none --batch-rows 16,32,64,128,192,256,512 --threads 2`, AMD
# EPYC Zen 5, quiet, 2026-12-02 22:29 UTC) on SmolLM2's four Q4_1 projections, with two activation
# planes: vs the bf16 tiles 1.6-1.9x at 16 rows, 1.2-1.4x at 32, 1.0-2.2x at 64, 1.0-1.3x at 128,
# 1.0-1.2x at 192, 0.9-1.05x at 256, 0.8-0.9x at 512; one plane is 1.5-2.3x faster than two.
GEMM_MIN_ROWS = 8
GEMM_AUTO_MAX_ROWS = 128
# From this many rows on, where the CPU has AMX, gemm_amx.c (W decoded to bf16 once per call,
# AMX bf16 tiles) replaces the 8-bit GEMM and the bf16 tiles (`amx_gemm`). Measured on SmolLM2's
# five shapes (Xeon with AMX, 2 threads, fp32 x and y, quiet, 2026-12-03 13:47 UTC) against the
# 8-bit GEMM with auto planes: 0.65-0.78x at 8 rows (decoding W to bf16 dominates), 0.97-1.16x at
# 16, 1.02-1.23x at 24, 1.26-1.46x at 32, 1.65-2.3x at 128, 2.0-2.8x at 512; 1.0-1.8x torch's bf16
# matmul on a bf16 weight at 16-128 rows. bf16 rounding only: the Quickstart answer holds.
AMX_MIN_ROWS = 16
GEMM_CHUNK_BYTES = 1 << 21       # gemm_q.c's CHUNK_BYTES: 8-bit activation bytes held at once
TILE_ELEMENTS = 1 << 22          # weights per dequantized tile: 8 MiB of bf16 workspace at most


def available() -> bool:
    """True when the native kernel is built and loadable (built on first call)."""
    return _LIBRARY.lib is not None


def int8_activations() -> bool:
    """Whether block matmuls (other than the `exact` LM head's) quantize x to 8 bits per block of
    32: qmatmul (decode_q.c) below GEMM_MIN_ROWS rows, the blocked GEMM (gemm_q.c) from there on,
    instead of the fp32 kernel and the bf16 tiles. Where the CPU has AVX-512 VNNI (measured
    1.6-2x faster per call on Zen 5 at decode sizes, 1.3-3.6x the bf16 tiles from 8 to 512 rows,
    `benchmarks/weight_kernels.py`), or as `MEMLM_INT8_ACTIVATIONS` says (1: on, with the plain
    C integer paths on other CPUs; 0: off). Read per call: tests switch it."""
    env = os.environ.get("MEMLM_INT8_ACTIVATIONS", "")
    on = has_vnni() if env == "" else env != "0"
    return on and DECODE_LIBRARY.lib is not None


@dataclass
class BlockWeight:
    blocks: torch.Tensor      # (N, Kp / 32 * block bytes) uint8, contiguous
    codec: str                # "q8_0" | "q4_0" | "q4_1"
    in_features: int          # K (Kp = K rounded up to 32)
    out_features: int         # N

    @property
    def padded_in(self) -> int:
        return self.blocks.shape[1] // BLOCK_BYTES[self.codec] * QK


def check_codec(codec: str) -> str:
    if codec not in BLOCK_BYTES:
        raise ValueError(f"block codec must be one of {', '.join(CODECS)}, got {codec!r}")
    return codec


def block_bytes(n: int, k: int, codec: str) -> int:
    """Bytes of an (n, k) weight in `codec`."""
    return n * (-(-k // QK)) * BLOCK_BYTES[check_codec(codec)]


def from_gguf_bytes(raw: np.ndarray | torch.Tensor, codec: str, out_features: int, in_features: int) -> BlockWeight:
    """A GGUF tensor's bytes ((N, K/32 * block bytes) uint8) as a `BlockWeight`; a numpy array
    (a view of the mapped file) is copied once, a tensor is kept."""
    data = torch.from_numpy(np.array(raw, copy=True)) if isinstance(raw, np.ndarray) else raw.contiguous()
    blocks = data.reshape(out_features, -1)
    if blocks.dtype != torch.uint8 or blocks.shape[1] != block_bytes(1, in_features, codec):
        raise ValueError(f"{codec} bytes of shape {tuple(raw.shape)} do not hold a ({out_features}, "
                         f"{in_features}) weight")
    return BlockWeight(blocks, codec, in_features, out_features)


def quantize(w: torch.Tensor, codec: str) -> BlockWeight:
    """fp32 (N, K) -> blocks, as llama.cpp quantizes (`gguf.quants.quantize`)."""
    from gguf import GGMLQuantizationType, quants

    check_codec(codec)
    n, k = w.shape
    kp = -(-k // QK) * QK
    dense = F.pad(w.detach().float(), (0, kp - k)).numpy()
    raw = quants.quantize(dense, GGMLQuantizationType[codec.upper()])
    return BlockWeight(torch.from_numpy(np.ascontiguousarray(raw)).view(n, -1), codec, k, n)


def quantize_q8_0(w: torch.Tensor, chunk_rows: int = 1024) -> BlockWeight:
    """fp32 (N, K) -> Q8_0 blocks in torch, `chunk_rows` rows at a time (a few MiB of temporaries):
    per block of 32, d = max|w| / 127 (stored fp16) and q = roundf(w * (1 / d)): byte for byte
    what `quantize(w, "q8_0")` (gguf's numpy quantizer) writes, without its whole-tensor copies."""
    n, k = w.shape
    kp = -(-k // QK) * QK
    out = torch.empty(n, kp // QK * BLOCK_BYTES["q8_0"], dtype=torch.uint8)
    for r in range(0, n, chunk_rows):
        x = F.pad(w[r:r + chunk_rows].detach().float(), (0, kp - k)).view(-1, kp // QK, QK)
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1 / d.clamp_min(torch.finfo(torch.float32).tiny), 0)   # as gguf: x * (1 / d)
        v = x * inv
        a = v.abs()
        q = torch.sign(v) * (a.floor() + (2 * (a - a.floor())).floor())    # C roundf: halves away from 0
        blocks = out[r:r + chunk_rows].view(-1, kp // QK, BLOCK_BYTES["q8_0"])
        blocks[..., :2] = d.to(torch.float16).view(torch.uint8).view(blocks.shape[0], -1, 2)
        blocks[..., 2:] = q.to(torch.int8).view(torch.uint8)
    return BlockWeight(out, "q8_0", k, n)


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block (..., G, bytes) as fp32 (..., G, 1)."""
    return b[..., at:at + 2].contiguous().view(torch.float16).float()


def dequantize_rows(blocks: torch.Tensor, codec: str, in_features: int) -> torch.Tensor:
    """(R, row bytes) uint8 rows of blocks -> (R, in_features) fp32, exactly what they encode."""
    r = blocks.shape[0]
    b = blocks.view(r, -1, BLOCK_BYTES[check_codec(codec)])                      # (R, G, bytes)
    d = _half(b, 0)
    if codec == "q8_0":
        w = b[..., 2:].contiguous().view(torch.int8).float() * d
    else:
        qs = b[..., 4:] if codec == "q4_1" else b[..., 2:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1).float()                        # (R, G, 32)
        w = q * d + _half(b, 2) if codec == "q4_1" else (q - 8) * d
    return w.reshape(r, -1)[:, :in_features]


def dequantize(weight: BlockWeight) -> torch.Tensor:
    """The fp32 (N, K) weight the kernel multiplies by."""
    return dequantize_rows(weight.blocks, weight.codec, weight.in_features)


def int8_gemm(rows: int | None = None) -> bool:
    """Whether a block matmul of `rows` rows (GEMM_MIN_ROWS or more; None: any such count) takes
    the blocked 8-bit GEMM, given `int8_activations()` and its library built. `MEMLM_INT8_GEMM`:
    `auto` (the default) depends on the planes (`gemm_planes`): with `auto` planes (one plane,
    a second for outlier blocks) at every row count, where it beats the bf16 tiles from 8 rows
    to prefill chunks; with 2 from GEMM_MIN_ROWS to GEMM_AUTO_MAX_ROWS rows (decode batches,
    short prefills); with 1 never: about 1% relative error per projection on SmolLM2's real
    activations flips the embedded model's greedy answer to the Quickstart prompt ("What is the
    capital of France?": "L'Etoile, la Marseillaise, ..." instead of "The capital of France is
    Paris."). `1`: at every row count; `0`: never. Read per call: tests switch it."""
    mode = os.environ.get("MEMLM_INT8_GEMM", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MEMLM_INT8_GEMM must be auto, 0 or 1, got {mode!r}")
    if mode == "0" or not int8_activations() or GEMM_LIBRARY.lib is None:
        return False
    planes, outlier = gemm_planes()
    if mode == "1" or outlier > 0:
        return True
    return planes == 2 and (rows is None or rows <= GEMM_AUTO_MAX_ROWS)


# `auto` planes: a second plane where a block's max |x| exceeds this many times the row's rms.
# 32 keeps the Quickstart answer (0.2% of its blocks), 16 (~2%) leaves a margin; lower ratios buy
# perplexity with throughput (BENCHMARKS.md, "A second plane for outlier blocks", "Ninth round").
OUTLIER_RATIO = 16.0


def gemm_planes() -> tuple[int, float]:
    """(planes, outlier ratio) of the blocked GEMM's activations, `MEMLM_GEMM_PLANES`: `auto`
    (the default) quantizes each block of 32 to 8 bits and adds a second 8-bit plane (what the
    first left, ~15 bits in all) only to blocks with a massive channel (max |x| > OUTLIER_RATIO
    x the row's rms; `auto:R` uses R, for the LM head's GEMM too); `2` gives every block both
    planes; `1` none (llama.cpp's Q8 activations). Read per call: tests switch it."""
    env = os.environ.get("MEMLM_GEMM_PLANES", "auto")
    if env in ("1", "2", "auto"):
        return (2, OUTLIER_RATIO) if env == "auto" else (int(env), 0.0)
    ratio = env[5:] if env.startswith("auto:") else ""
    if ratio.replace(".", "", 1).isdigit() and float(ratio) > 0:
        return 2, float(ratio)
    raise ValueError(f"MEMLM_GEMM_PLANES must be 1, 2, auto or auto:R (R > 0, the outlier ratio), got {env!r}")


def block_matmul(x: torch.Tensor, weight: BlockWeight, exact: bool = False,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (M, K) float -> (M, N) fp32 = x @ W.T. Unless `exact` (the LM head: fp32 activations
    below TILE_MIN_ROWS rows, the GEMM's auto planes from there on where it is on), where
    `int8_activations()`: 8-bit activations, decode_q.c's qmatmul below GEMM_MIN_ROWS rows and
    the blocked GEMM (gemm_q.c) from there on. Otherwise the fp32
    block kernel (rows 8 at a time) below TILE_MIN_ROWS rows and bf16 tiles of W through the
    bf16 GEMM from there on where it is fast. On CPUs with AMX, from AMX_MIN_ROWS rows (`exact`
    too), gemm_amx.c instead of all of these (`amx_gemm`): it reads a bf16 x as is and writes y
    in `out_dtype` where that is bf16; every other path returns fp32."""
    m = x.shape[0]
    if (m >= TILE_MIN_ROWS or not exact) and x.device.type == "cpu" and amx_gemm(m):
        return _amx_gemm(x, weight, out_dtype)
    x = x.float()
    kp = weight.padded_in
    if x.shape[1] != kp:
        x = F.pad(x, (0, kp - x.shape[1]))
    if not (available() and x.device.type == "cpu"):
        return x[:, :weight.in_features] @ dequantize(weight).t()
    x = x.contiguous()
    if m >= GEMM_MIN_ROWS and not exact and int8_gemm(m):
        return _int8_gemm(x, weight)
    if exact and m >= TILE_MIN_ROWS and _exact_gemm():
        return _int8_gemm(x, weight, (2, gemm_planes()[1] or OUTLIER_RATIO))
    if m >= TILE_MIN_ROWS and _bf16_gemm_is_fast():
        return _tiled_bf16_matmul(x, weight)
    y = torch.empty(m, weight.out_features, dtype=torch.float32)
    if m <= INT8_MAX_ROWS and not exact and int8_activations():
        DECODE_LIBRARY.lib.qmatmul(GGML_TYPE_IDS[weight.codec], weight.blocks.data_ptr(), x.data_ptr(),
                                   y.data_ptr(), m, weight.out_features, kp)
        return y
    _LIBRARY.lib.gemv_q(GGML_TYPE_IDS[weight.codec], weight.blocks.data_ptr(), x.data_ptr(), y.data_ptr(),
                        m, weight.out_features, kp)
    return y


def amx_gemm(rows: int) -> bool:
    """Whether a block matmul of `rows` rows takes gemm_amx.c: `MEMLM_AMX` `auto` (the default)
    from AMX_MIN_ROWS rows on where the CPU has AMX, the library built with it and Linux grants
    the tile state; `1` at every row count (where it can run); `0` never. Read per call."""
    mode = os.environ.get("MEMLM_AMX", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MEMLM_AMX must be auto, 0 or 1, got {mode!r}")
    if mode == "0" or (mode == "auto" and rows < AMX_MIN_ROWS):
        return False
    return _amx_ready()


@functools.cache
def _amx_ready() -> bool:
    if AMX_LIBRARY.lib is None:
        return False
    out = torch.zeros(1, dtype=torch.int32)
    AMX_LIBRARY.lib.amx_ready(out.data_ptr())
    return bool(out[0])


def _amx_gemm(x: torch.Tensor, weight: BlockWeight, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (M, K) -> (M, N) through gemm_amx.c (bf16 W and x, fp32 sums): x bf16 is read as is
    (any other dtype as fp32), y is bf16 where `out_dtype` is, else fp32."""
    x = x if x.dtype in (torch.bfloat16, torch.float32) else x.float()
    if x.shape[1] != weight.padded_in:
        x = F.pad(x, (0, weight.padded_in - x.shape[1]))
    x = x.contiguous()
    ybf = out_dtype == torch.bfloat16
    y = torch.empty(x.shape[0], weight.out_features, dtype=torch.bfloat16 if ybf else torch.float32)
    status = torch.zeros(1, dtype=torch.int32)
    AMX_LIBRARY.lib.amx_gemm(GGML_TYPE_IDS[weight.codec], weight.blocks.data_ptr(), x.data_ptr(), y.data_ptr(),
                             x.shape[0], weight.out_features, weight.padded_in,
                             int(x.dtype == torch.bfloat16) | int(ybf) << 1, status.data_ptr())
    if int(status[0]) != 0:
        raise MemoryError("the AMX block GEMM could not allocate its workspace (under 3 MiB) or use the "
                          "tiles: free memory or set MEMLM_AMX=0")
    return y


def _exact_gemm() -> bool:
    """Whether the `exact` LM head takes the GEMM with `auto` planes (`auto:R`'s R where set, else
    whatever MEMLM_GEMM_PLANES says) from TILE_MIN_ROWS rows on instead of the bf16 tiles, where the
    GEMM is on at all. It keeps no per-shape state, so the head costs no oneDNN state per row bucket
    (25 MiB resident on SmolLM2 at 512-token steps, and a warm-up transient), at the tiles' speed
    (`benchmarks/weight_kernels.py`: 5.27 against 5.33 ms at 32 rows; both planes everywhere
    took 9.1 ms). Below TILE_MIN_ROWS the head keeps fp32 activations (exact greedy picks)."""
    return int8_gemm() and GEMM_LIBRARY.lib is not None


def _int8_gemm(x: torch.Tensor, weight: BlockWeight, planes: tuple[int, float] | None = None) -> torch.Tensor:
    """x (M, Kp) fp32 contiguous -> (M, N) fp32 through gemm_q.c (8-bit activations; `planes`:
    (planes, outlier ratio), default `gemm_planes()`)."""
    y = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
    status = torch.zeros(1, dtype=torch.int32)
    planes, outlier = planes or gemm_planes()
    GEMM_LIBRARY.lib.qgemm(GGML_TYPE_IDS[weight.codec], weight.blocks.data_ptr(), x.data_ptr(), y.data_ptr(),
                           x.shape[0], weight.out_features, weight.padded_in, planes, outlier, status.data_ptr())
    if int(status[0]) != 0:
        raise MemoryError(f"the 8-bit block GEMM could not allocate its workspace (about "
                          f"{GEMM_CHUNK_BYTES >> 20} MiB): free memory or set MEMLM_INT8_ACTIVATIONS=0")
    return y


@functools.cache
def _bf16_gemm_is_fast() -> bool:
    from memlm.kernels.cpu import bf16_matmul_is_fast
    return bf16_matmul_is_fast(torch.device("cpu"))


def _tiled_bf16_matmul(x: torch.Tensor, weight: BlockWeight) -> torch.Tensor:
    """x (M, Kp) fp32 -> (M, N) fp32 through bf16 tiles of W (at most TILE_ELEMENTS each)."""
    m, n, kp = x.shape[0], weight.out_features, weight.padded_in
    xb = F.pad(x.bfloat16(), (0, 0, 0, row_bucket(m) - m))     # bounded oneDNN shapes (row_bucket)
    y = torch.empty(m, n, dtype=torch.float32)
    rows = max(1, min(n, TILE_ELEMENTS // kp))
    tile = torch.empty(rows, kp, dtype=torch.bfloat16)
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        _LIBRARY.lib.dequant_q_bf16(GGML_TYPE_IDS[weight.codec], weight.blocks[n0].data_ptr(),
                                    tile.data_ptr(), r, kp)
        y[:, n0:n0 + r] = F.linear(xb, tile[:r])[:m]
    return y


def warm_up(weight: BlockWeight, m: int, exact: bool = False) -> None:
    """Create the per-shape state `block_matmul(x, weight, exact)` of `m` rows needs (oneDNN's,
    for the bf16 tiles) without its (m, N) output: the tiles' shapes depend only on the tile
    height, so one full tile and the last partial one, each run as a weight of its own, make
    them all. (The whole LM head at 2048 rows would be a 400 MB output, outside the budget,
    before the plan exists.) Nothing to do where those rows take the 8-bit GEMM (no state)."""
    if (not exact and m >= GEMM_MIN_ROWS and int8_gemm(m)) or amx_gemm(m):
        return
    if exact and m >= TILE_MIN_ROWS and _exact_gemm():
        return
    kp, n = weight.padded_in, weight.out_features
    rows = max(1, min(n, TILE_ELEMENTS // kp))
    x = torch.zeros(m, kp)
    for r in sorted({rows, n % rows} - {0}):
        block_matmul(x, BlockWeight(weight.blocks[:r], weight.codec, weight.in_features, r), exact)


def stream_read_gbps(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth (GB/s) summing an `n_bytes` fp32 array on all threads
    (native), or torch's sum without it: the ceiling a bandwidth-bound decode step can reach."""
    import time

    a = torch.ones(n_bytes // 4)
    out = torch.empty(1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if available():
            _LIBRARY.lib.stream_sum(a.data_ptr(), a.numel(), out.data_ptr())
        else:
            a.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9
