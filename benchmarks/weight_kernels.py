"""Weight kernels, same process: memlm's native block kernel (GGUF Q4_1 / Q8_0 kept as loaded)
vs torch's int4 / int8 weight-only kernels and bf16 / fp32 matmuls, on SmolLM2-135M's
projection shapes, for 1..64 activation rows; plus the measured streaming read bandwidth and
the fraction of it a batch-1 decode step's weight reads reach. "native" is the fp32-activation
block kernel (csrc/gemv_q.c), "native x8" the 8-bit-activation path (csrc/decode_q.c below
`gemv.GEMM_MIN_ROWS` rows, csrc/gemm_q.c from there on; AVX-512 VNNI; the per-token total uses it where `gemv.int8_activations()` holds, as the model does).
Then the batched table (`--batch-rows`, prefill chunks and large decode batches): the blocked
8-bit GEMM (csrc/gemm_q.c) vs the bf16-tile path (W dequantized to bf16 tiles for torch's bf16
GEMM) on the same Q4_1 blocks vs the bf16 method's own matmul (its oneDNN-prepacked bf16 weight,
rows padded to `row_bucket`) vs, on CPUs with AMX, csrc/gemm_amx.c (the blocks decoded to bf16 once
per call, AMX bf16 tiles), each from an fp32 x as the model passes it; the head in Q8_0.

    python benchmarks/weight_kernels.py [--threads 2] [--rows 1,2,4,8,16,64]
    python benchmarks/weight_kernels.py --rows none --batch-rows 8,16,32,64,128,512,2048

Each cell is the best of `--repeats` timed runs of one call (Python overhead included, as the
model pays it). Ratios are within this run only: the machine may be shared.
"""
from __future__ import annotations

import argparse
import os

import torch
from kernels import timed     # benchmarks/kernels.py: best of `repeats` after a warm-up call

# (name, out, in, count per token) of SmolLM2-135M: 30 layers, fused q|k|v and gate|up, tied head
SHAPES = [("qkv", 960, 576, 30), ("o", 576, 576, 30), ("gate_up", 3072, 576, 30), ("down", 576, 1536, 30),
          ("head", 49152, 576, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16,64")
    ap.add_argument("--batch-rows", default="8,16,32,64,128,512,2048")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))   # memlm's kernels (loaded later)
    from memlm.kernels import gemv, quant
    if args.rows != "none":
        decode_table(args, gemv, quant)
    if args.batch_rows != "none":
        batched_table(args, gemv)


def batched_table(args, gemv) -> None:
    """gemm_q.c vs bf16 tiles vs the bf16 method's prepacked matmul, per shape and row count."""
    from memlm.kernels.cpu import row_bucket
    from memlm.models.linear.bf16 import prepack
    import torch.nn.functional as F

    def path(name: str, x, w):
        # gemm: two 8-bit planes per activation; gemm1: one plane (llama.cpp's Q8); gemma: one,
        # and a second for outlier blocks (the default, `gemv.gemm_planes`)
        os.environ["MEMLM_AMX"] = "1" if name == "amx" else "0"
        os.environ["MEMLM_INT8_ACTIVATIONS"] = "0" if name == "tiles" else "1"
        os.environ["MEMLM_INT8_GEMM"] = "0" if name == "tiles" else "1"
        os.environ["MEMLM_GEMM_PLANES"] = {"gemm1": "1", "gemma": "auto"}.get(name, "2")
        return gemv.block_matmul(x, w)

    def bf16_method(x, wb, packed):
        xb = x.to(torch.bfloat16)
        xb = F.pad(xb, (0, 0, 0, row_bucket(x.shape[0]) - x.shape[0]))
        y = (F.linear(xb, wb) if packed is None
             else torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], ""))
        return y[:x.shape[0]].float()

    def qmatmul(x, w):
        y = torch.empty(x.shape[0], w.out_features)
        gemv.DECODE_LIBRARY.lib.qmatmul(gemv.GGML_TYPE_IDS[w.codec], w.blocks.data_ptr(), x.data_ptr(),
                                        y.data_ptr(), x.shape[0], w.out_features, w.padded_in)
        return y

    print(f"# batched: 8-bit blocked GEMM (gemm_q.c) vs bf16 tiles of the same blocks vs the bf16 "
          f"method's prepacked bf16 matmul; {args.threads} threads, best of {args.repeats}; "
          f"int8 GEMM built: {gemv.GEMM_LIBRARY.lib is not None}, VNNI: {gemv.int8_activations()}, "
          f"AMX GEMM usable: {gemv.amx_gemm(gemv.AMX_MIN_ROWS)}")
    print("# `auto planes` runs on x with two massive channels (x 40, as SmolLM2's hidden states have), "
          "so 2 of each row's blocks of 32 get the second plane; the other cells on plain randn x")
    print("| shape | rows | gemm_q 2 planes us | 1 plane us | auto planes us | decode_q qmatmul us | bf16 tiles us | "
          "bf16 method us | AMX us | qmatmul / gemm | tiles / gemm | bf16 / gemm | 1 plane / gemm | tiles / auto | "
          "auto / AMX | bf16 / AMX |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    saved = {v: os.environ.get(v) for v in ("MEMLM_INT8_ACTIVATIONS", "MEMLM_INT8_GEMM", "MEMLM_GEMM_PLANES",
                                             "MEMLM_AMX")}
    amx = gemv.amx_gemm(gemv.AMX_MIN_ROWS)
    for name, n, k, _ in SHAPES:
        w = torch.randn(n, k) * 0.05
        held = gemv.quantize(w, "q8_0" if name == "head" else "q4_1")
        wb = w.to(torch.bfloat16)
        packed = prepack(wb)
        for m in [int(r) for r in args.batch_rows.split(",")]:
            if name == "head" and m > 512:
                continue                         # a (2048, 49152) output: never a model's step
            x = torch.randn(m, k)
            xo = x.clone()
            xo[:, [k // 7, k // 2]] *= 40.0
            cells = [("gemm", lambda: path("gemm", x, held)), ("gemm1", lambda: path("gemm1", x, held)),
                     ("gemma", lambda: path("gemma", xo, held)),
                     ("tiles", lambda: path("tiles", x, held)),
                     ("bf16", lambda: bf16_method(x, wb, packed))]
            if m <= 16 and gemv.DECODE_LIBRARY.lib is not None:
                cells.append(("qmatmul", lambda: qmatmul(x, held)))
            if amx:
                cells.append(("amx", lambda: path("amx", x, held)))
            t = {label: timed(fn, args.repeats) for label, fn in cells}
            q = (f"{t['qmatmul'] * 1e6:.1f}", f"{t['qmatmul'] / t['gemm']:.2f}x") if "qmatmul" in t else ("-", "-")
            a = ((f"{t['amx'] * 1e6:.1f}", f"{t['gemma'] / t['amx']:.2f}x", f"{t['bf16'] / t['amx']:.2f}x")
                 if amx else ("-", "-", "-"))
            print(f"| {name} {n}x{k} {held.codec} | {m} | {t['gemm'] * 1e6:.1f} | {t['gemm1'] * 1e6:.1f} | "
                  f"{t['gemma'] * 1e6:.1f} | {q[0]} | {t['tiles'] * 1e6:.1f} | {t['bf16'] * 1e6:.1f} | {a[0]} | {q[1]} | "
                  f"{t['tiles'] / t['gemm']:.2f}x | {t['bf16'] / t['gemm']:.2f}x | {t['gemm1'] / t['gemm']:.2f}x | "
                  f"{t['tiles'] / t['gemma']:.2f}x | {a[1]} | {a[2]} |")
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def decode_table(args, gemv, quant) -> None:

    print(f"# native kernel available: {gemv.available()}, {args.threads} threads")
    gbps = gemv.stream_read_gbps()
    print(f"# streaming read bandwidth (sum of 512 MiB fp32, best of 5): {gbps:.1f} GB/s")
    x8 = gemv.int8_activations()
    print(f"# 8-bit activations chosen for decode rows: {x8}")

    def act(on: bool, x, w):
        os.environ["MEMLM_INT8_ACTIVATIONS"] = "1" if on else "0"
        os.environ["MEMLM_AMX"] = "0"        # the decode kernels (gemm_amx.c: the batched table)
        return gemv.block_matmul(x, w)
    totals: dict[str, float] = {}
    model_time = 0.0
    bytes_per_token = {"q4_1": 0, "q8_0": 0}
    for name, n, k, count in SHAPES:
        w = torch.randn(n, k) * 0.05
        q41, q80 = gemv.quantize(w, "q4_1"), gemv.quantize(w, "q8_0")
        i4 = quant.quantize_int4(w, 32, torch.bfloat16)
        i8 = quant.quantize_int8(w, torch.bfloat16)
        wb = w.to(torch.bfloat16)
        bytes_per_token["q8_0" if name == "head" else "q4_1"] += (q80 if name == "head" else q41).blocks.numel() * count
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k)
            xb = x.to(torch.bfloat16)
            cells = {
                "native q4_1": lambda: act(False, x, q41),
                "native q8_0": lambda: act(False, x, q80),
                "native x8 q4_1": lambda: act(True, x, q41),
                "native x8 q8_0": lambda: act(True, x, q80),
                "torch int4 g32": lambda: quant.int4_matmul(xb, i4.packed, i4.scales_zeros, 32, n),
                "torch int8 row": lambda: quant.int8_matmul(xb, i8.qweight, i8.scales),
                "torch bf16": lambda: xb @ wb.t(),
                "torch fp32": lambda: x @ w.t(),
            }
            times = {label: timed(fn, args.repeats) for label, fn in cells.items()}
            base = times["torch int4 g32"]
            row = "  ".join(f"{label} {t * 1e6:8.1f}us ({base / t:4.2f}x)" for label, t in times.items())
            print(f"{name:>8} {n:>5}x{k:<5} rows {m:>3}: {row}")
            if m == 1:      # the head keeps fp32 activations (`exact`); projections x8 where chosen
                model_time += times["native q8_0" if name == "head" else
                                    "native x8 q4_1" if x8 else "native q4_1"] * count
                for label, t in times.items():
                    totals[label] = totals.get(label, 0.0) + t * count
    print("# batch-1 weight time per token (all 30 layers + head), ratio vs torch int4 g32:")
    for label, t in totals.items():
        print(f"  {label:<16} {t * 1e3:7.2f} ms/token  ({totals['torch int4 g32'] / t:4.2f}x)")
    total_bytes, t = sum(bytes_per_token.values()), model_time
    print(f"# the embedded file as memlm holds it (Q4_1 projections, Q8_0 tied head): "
          f"{total_bytes / 2**20:.1f} MiB read per token in {t * 1e3:.2f} ms = {total_bytes / t / 1e9:.1f} GB/s, "
          f"{total_bytes / t / 1e9 / gbps * 100:.0f}% of the streaming bandwidth")


if __name__ == "__main__":
    main()
