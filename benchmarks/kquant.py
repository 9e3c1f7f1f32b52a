"""K-quant GGUF weights (Q4_K / Q5_K / Q6_K) kept as loaded vs requantized, same invocation.

1. Kernels (`--kernels`): one call of `kquant.matmul` (8-bit activations where
   `gemv.int8_activations()`; "f32": fp32 activations, the LM head's path) on SmolLM2-135M's
   projection shapes whose K is a multiple of 256, vs the same weights in Q4_1 (`gemv`, decode_q.c)
   and requantized to torch's int4 g32 (`quant.int4_matmul`, what loading did before), for 1..8
   rows: best of `--repeats` runs of `--inner` calls, process CPU seconds per call (the machine
   is shared: CPU time is steadier than wall time; 1 thread by default so they are the same work).
2. Decode (`--decode`): a K-quant copy of the embedded SmolLM2 GGUF (every 2-D tensor whose rows
   are whole 256-weight super-blocks, i.e. the 30 ffn_down, rewritten as `--codec` from the
   file's own values; the rest copied as they are, Q4_1 / Q8_0) loaded with `--weight-dtype
   auto` (K-quant blocks kept) vs the same file with the K-quant tensors requantized to int4 g32
   (the method's `block_codecs` without K-quants: the path before) vs the original Q4_1 file:
   weight bytes held (by codec), decode CPU seconds per token ((1 + N tokens) - (1 token), greedy,
   each in its own subprocess, alternated `--rounds` times, best kept), and agreement with the
   copy dequantized to fp32: how many greedy tokens match before the first difference (a near
   tie flips the rest), and the teacher-forced top-1 agreement along fp32's greedy tokens.

    python benchmarks/kquant.py --kernels --decode [--codec q4_k] [--threads 1] [--new-tokens 48]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIES = Path(os.path.expanduser("~")) / ".cache" / "memlm" / "bench"
SHAPES = [("down", 576, 1536), ("gate_up x1536", 3072, 1536), ("qkv x768", 960, 768)]
PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best_cpu(fn, repeats: int, inner: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = cpu_seconds()
        for _ in range(inner):
            fn()
        best = min(best, (cpu_seconds() - t0) / inner)
    return best


def kernels(args) -> None:
    import torch
    from memlm.kernels import gemv, kquant, quant
    print(f"kernels: {args.threads} thread(s), int8 activations: {gemv.int8_activations()}; "
          "us of process CPU per call (best of repeats)")
    print(f"{'shape':>14} {'rows':>4} " + " ".join(f"{c:>8} {c + ' f32':>9}" for c in kquant.CODECS)
          + f" {'q4_1':>8} {'int4g32':>8} {'q4_k/q4_1':>9} {'q4_k/int4':>9}")
    for name, n, k in SHAPES:
        w = torch.randn(n, k) * 0.05
        held = {c: kquant.quantize(w, c) for c in kquant.CODECS}
        q41 = gemv.quantize(w, "q4_1")
        i4 = quant.quantize_int4(w, 32, torch.bfloat16)
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            t = {}
            for c, kw in held.items():
                t[c] = best_cpu(lambda: kquant.matmul(x, kw), args.repeats, args.inner)
                t[c + " f32"] = best_cpu(lambda: kquant.matmul(x, kw, exact=True), args.repeats, args.inner)
            t["q4_1"] = best_cpu(lambda: gemv.block_matmul(x, q41), args.repeats, args.inner)
            t["int4"] = best_cpu(lambda: quant.int4_matmul(xb, i4.packed, i4.scales_zeros, 32, n),
                                 args.repeats, args.inner)
            cells = " ".join(f"{t[c] * 1e6:8.0f} {t[c + ' f32'] * 1e6:9.0f}" for c in kquant.CODECS)
            print(f"{name:>14} {m:>4} {cells} {t['q4_1'] * 1e6:8.0f} {t['int4'] * 1e6:8.0f} "
                  f"{t['q4_k'] / t['q4_1']:9.2f} {t['q4_k'] / t['int4']:9.2f}")


def kquant_copy(codec: str) -> Path:
    """The embedded SmolLM2 GGUF with its 256-divisible 2-D tensors rewritten as `codec`."""
    sys.path.insert(0, str(ROOT))
    import gguf
    import numpy as np
    import torch
    from memlm.kernels import kquant
    from memlm.models.registry import resolve_preset
    src = resolve_preset("smollm2-135m-instruct")
    out = COPIES / f"{src.stem}.{codec}-down.gguf"
    if out.exists():
        return out
    from single_stream import writer_like
    reader = gguf.GGUFReader(str(src))
    tmp = out.with_suffix(".tmp")
    w = writer_like(reader, tmp)
    target = gguf.GGMLQuantizationType[codec.upper()]
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) == 2 and shape[1] % kquant.QK_K == 0:
            dense = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            blocks = kquant.quantize(torch.from_numpy(dense), codec).blocks.numpy()
            w.add_tensor(t.name, blocks, raw_dtype=target)
        else:
            raw = np.array(t.data)
            w.add_tensor(t.name, raw, raw_shape=shape if t.tensor_type in (0, 1) else None,
                         raw_dtype=None if t.tensor_type in (0, 1) else t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    os.replace(tmp, out)
    return out


def worker(args) -> None:
    """One configuration in this process: prints a JSON line."""
    import torch
    if args.worker == "requantized":
        from memlm.kernels import kquant
        from memlm.models.linear.int4 import Int4Method
        Int4Method.block_codecs = tuple(c for c in Int4Method.block_codecs if c not in kquant.CODECS)
        Int4Method.table_block_codecs = tuple(c for c in Int4Method.table_block_codecs if c not in kquant.CODECS)
    from memlm import LLM, SamplingParams
    dtype = "fp32" if args.worker == "fp32" else "int4" if args.worker == "requantized" else "auto"
    llm = LLM(args.gguf, weight_dtype=dtype, num_threads=args.threads, verbose=False)
    ids = llm.tokenizer.encode(PROMPT)
    def run(n):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t0, w0 = cpu_seconds(), time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0].outputs[0].token_ids
        return cpu_seconds() - t0, time.perf_counter() - w0, list(out)
    run(2)
    c1, w1, _ = run(1)
    cn, wn, tokens = run(1 + args.new_tokens)
    method = llm.model.linear_method
    agree = None
    if args.ref:      # teacher-forced: this model's argmax along the fp32 model's greedy tokens
        ref = [int(t) for t in args.ref.split(",")]
        with torch.inference_mode():
            seq = torch.tensor([ids + ref[:-1]])
            pred = llm.model.compute_logits(llm.model.forward_dense(seq)[0])[len(ids) - 1:].argmax(-1)
        agree = float((pred == torch.tensor(ref)).float().mean())
    print(json.dumps({"agree": agree, "cpu_per_token": (cn - c1) / args.new_tokens, "wall_per_token": (wn - w1) / args.new_tokens,
                      "weight_bytes": llm.loaded.weight_bytes, "by_codec": method.bytes_by_codec(llm.model),
                      "tokens": tokens, "threads": torch.get_num_threads()}))


def decode(args) -> None:
    sys.path.insert(0, str(ROOT))
    from memlm.models.registry import resolve_preset
    copy = kquant_copy(args.codec)
    configs = {"fp32": copy, "kept": copy, "requantized": copy, "q4_1 file": resolve_preset("smollm2-135m-instruct")}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, path in configs.items():
            if name == "fp32" and name in best:
                continue
            cmd = [sys.executable, __file__, "--worker", name.split()[0] if name != "q4_1 file" else "kept",
                   "--gguf", str(path), "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
            if name != "fp32":
                cmd += ["--ref", ",".join(str(t) for t in best["fp32"]["tokens"])]
            line = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env=os.environ | {"OMP_NUM_THREADS": str(args.threads)}).stdout.strip().splitlines()[-1]
            r = json.loads(line)
            if name not in best or r["cpu_per_token"] < best[name]["cpu_per_token"]:
                best[name] = r
    ref = best["fp32"]["tokens"]
    print(f"decode: SmolLM2 with ffn_down in {args.codec} (copy {copy.name}), {args.threads} thread(s), "
          f"{args.new_tokens} greedy tokens, best of {args.rounds}")
    print(f"{'config':>12} {'ms CPU/tok':>10} {'ms wall/tok':>11} {'weights MiB':>11}  greedy = fp32  "
          f"teacher-forced argmax = fp32  by codec (MiB)")
    for name in ("kept", "requantized", "q4_1 file", "fp32"):
        r = best[name]
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b), len(ref))
        agree = "" if r["agree"] is None else f"{r['agree'] * 100:.0f}%"
        codecs = ", ".join(f"{c} {b / 2**20:.1f}" for c, b in sorted(r["by_codec"].items()))
        print(f"{name:>12} {r['cpu_per_token'] * 1e3:10.2f} {r['wall_per_token'] * 1e3:11.2f} "
              f"{r['weight_bytes'] / 2**20:11.1f}  first {same:>3}/{len(ref)}  {agree:>6}  {codecs}")
    k, q = best["kept"], best["requantized"]
    print(f"kept / requantized: CPU per token {k['cpu_per_token'] / q['cpu_per_token']:.2f}x, "
          f"weight bytes {k['weight_bytes'] / q['weight_bytes']:.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--codec", default="q4_k", choices=("q4_k", "q5_k", "q6_k"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.worker:
        return worker(args)
    import torch
    torch.set_num_threads(args.threads)
    if args.kernels:
        kernels(args)
    if args.decode:
        decode(args)
    if not (args.kernels or args.decode):
        ap.error("pass --kernels and/or --decode")


if __name__ == "__main__":
    main()
