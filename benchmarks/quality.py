"""Quality of memlm's compute and storage settings: perplexity of the embedded SmolLM2 on
held-out text through the paged engine, for each weight dtype (fp32, bf16, int8, int4 with
32 or 128 inputs per group) x KV cache dtype x kernel choice. int4 at group 32 keeps the
GGUF file's own Q4_1 (projections) and Q8_0 (embedding, tied head) blocks, so its row against
the first (the same weights dequantized to fp32) measures the compute path alone.

Text: the first 1024 tokens of two files of the Python 3.11 documentation (Debian package
`python3.11-doc`, `make data` installs it); nothing in memlm was tuned on them. Those 2,046
scored tokens resolve about +-0.15% of perplexity between settings (the settings share most of
their rounding, yet single tokens move by ~0.03 nats); `--docs wide` scores 16 files (~16,000
tokens, ~8x the time), which resolves differences of a few hundredths of a percent. The engine runs
with 128-token steps, so most of each text's attention reads K/V back from the paged cache
(only a step's own chunk attends to fresh K/V), which is what the KV dtype affects.

    python benchmarks/quality.py [--threads 1] [--tokens 1024] [--only int4] [--docs two|wide]

Each setting runs in its own process (MEMLM_NATIVE must be set before the kernels load).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
FILES = ["tutorial/classes.rst.txt", "library/functions.rst.txt"]
WIDE_FILES = [f"tutorial/{name}.rst.txt" for name in (       # the tutorial's files over 12 kB
    "classes", "controlflow", "datastructures", "errors", "inputoutput", "introduction", "modules", "stdlib2")] + [
    f"library/{name}.rst.txt" for name in (
        "collections", "itertools", "json", "re", "os.path", "string", "datetime", "pathlib")]
DOCS_SETS = {"two": FILES, "wide": WIDE_FILES}
SETTINGS = [  # (label, weight dtype[:int4 group size][@step tokens], kv_dtype, MEMLM_NATIVE[:VAR=VALUE,...])
    ("fp32 weights, fp32 KV", "float32", "float32", "1"),
    ("fp32 weights, fp16 KV", "float32", "float16", "1"),
    ("fp32 weights, int8 KV", "float32", "int8", "1"),
    ("bf16 path (native kernels), fp16 KV  [default on AMX]", "bfloat16", "float16", "1"),
    ("bf16 path (torch fallback), fp16 KV", "bfloat16", "float16", "0"),
    ("bf16 path (native kernels), int8 KV", "bfloat16", "int8", "1"),
    ("int8 weights (Q8_0 blocks; int8 rows for the embedding / head), fp32 KV", "int8", "float32", "1"),
    ("int4 g32 = the file's Q4_1/Q8_0 blocks kept (native), fp32 KV", "int4:32", "float32", "1"),
    ("int4 g32 = the file's Q4_1/Q8_0 blocks kept (torch), fp32 KV", "int4:32", "float32", "0"),
    ("int4 weights g128 (requantized), fp32 KV", "int4:128", "float32", "1"),
    ("int4 g32 blocks kept (native), fp16 KV", "int4:32", "float16", "1"),
    # 128-token steps with the 8-bit path off: bf16 tiles of W instead of the blocked 8-bit GEMM
    ("int4 g32 blocks kept (native), 8-bit activations off (bf16 tiles), fp32 KV", "int4:32", "float32",
     "1:MEMLM_INT8_ACTIVATIONS=0,MEMLM_AMX=0"),
    # CPUs with AMX: from gemv.AMX_MIN_ROWS rows the AMX bf16 GEMM (the default there), and without it
    ("int4 g32 blocks kept (native), AMX off (8-bit GEMM), fp32 KV", "int4:32", "float32", "1:MEMLM_AMX=0"),
    # the same with the second plane in more blocks: max |x| over 4x / 2x the row's rms, not 16x
    ("int4 g32 blocks kept (native), AMX off, GEMM auto:4 planes, fp32 KV", "int4:32", "float32",
     "1:MEMLM_AMX=0,MEMLM_GEMM_PLANES=auto:4"),
    ("int4 g32 blocks kept (native), AMX off, GEMM auto:2 planes, fp32 KV", "int4:32", "float32",
     "1:MEMLM_AMX=0,MEMLM_GEMM_PLANES=auto:2"),
    # 8-token steps: every matmul but the head takes the decode kernels (rows <= 8), with 8-bit
    # activations per block of 32 (AVX-512 VNNI) and without (fp32 activations)
    ("int4 g32 blocks kept, 8-token steps, 8-bit activations, fp32 KV", "int4:32@8", "float32", "1"),
    ("int4 g32 blocks kept, 8-token steps, fp32 activations, fp32 KV", "int4:32@8", "float32",
     "1:MEMLM_INT8_ACTIVATIONS=0"),
    # 512-token steps (prefill chunks): the blocked 8-bit GEMM's activation planes
    # (`gemv.gemm_planes`), and the bf16 tiles instead of it
    ("int4 g32 blocks kept, 512-token steps, defaults (AMX where present), fp32 KV", "int4:32@512", "float32", "1"),
    ("int4 g32 blocks kept, 512-token steps, GEMM auto planes, fp32 KV", "int4:32@512", "float32", "1:MEMLM_AMX=0"),
    ("int4 g32 blocks kept, 512-token steps, GEMM two planes, fp32 KV", "int4:32@512", "float32",
     "1:MEMLM_GEMM_PLANES=2,MEMLM_INT8_GEMM=1,MEMLM_AMX=0"),
    ("int4 g32 blocks kept, 512-token steps, GEMM one plane, fp32 KV", "int4:32@512", "float32",
     "1:MEMLM_GEMM_PLANES=1,MEMLM_INT8_GEMM=1,MEMLM_AMX=0"),
    ("int4 g32 blocks kept, 512-token steps, bf16 tiles, fp32 KV", "int4:32@512", "float32",
     "1:MEMLM_INT8_GEMM=0,MEMLM_AMX=0"),
]


def worker(dtype: str, kv_dtype: str, tokens: int, files: list[str]) -> dict:
    from memlm import LLM, SamplingParams
    dtype, _, step = dtype.partition("@")
    dtype, _, group = dtype.partition(":")
    llm = LLM("smollm2-135m-instruct", memory_budget="2GiB", verbose=False, dtype=dtype,
              kv_dtype=kv_dtype, max_num_batched_tokens=int(step) if step else 128,
              weight_group_size=int(group) if group else None)
    total, n, top1 = 0.0, 0, []
    for name in files:
        ids = llm.tokenizer.encode((DOCS / name).read_text())[:tokens]
        out = llm.generate([{"prompt_token_ids": ids}],
                           SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
        for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
            value = {t: (lp if isinstance(lp, float) else lp.logprob) for t, lp in entry.items()}
            total += value[ids[i]]
            top1.append(max(value, key=value.get))       # the greedy pick at this position
            n += 1
    return {"ppl": math.exp(-total / n), "tokens": n, "top1": top1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per document")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None, help="run only the settings whose label contains this")
    ap.add_argument("--docs", choices=sorted(DOCS_SETS), default="two",
                    help="held-out text: two files (2,046 tokens) or wide (16 files, ~16,000 tokens)")
    args = ap.parse_args()
    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(worker(*args.worker, args.tokens, DOCS_SETS[args.docs])))
        return
    if not all((DOCS / f).is_file() for f in DOCS_SETS[args.docs]):
        sys.exit(f"error: {DOCS} is missing: run `make data` (installs python3.11-doc)")
    rows, base = [], None
    for label, dtype, kv, native in SETTINGS:
        if args.only and args.only not in label and label != SETTINGS[0][0]:
            continue
        native, _, extra = native.partition(":")
        env = dict(os.environ, MEMLM_NATIVE=native, **dict(pair.split("=") for pair in extra.split(",") if pair))
        out = subprocess.run([sys.executable, __file__, "--worker", dtype, kv, "--threads", str(args.threads),
                              "--tokens", str(args.tokens), "--docs", args.docs],
                             env=env, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or res
        agree = sum(a == b for a, b in zip(res["top1"], base["top1"])) / len(base["top1"])
        rows.append((label, res["ppl"], res["tokens"]))
        print(f"  {label:<55} ppl {res['ppl']:.4f}  ({(res['ppl'] / base['ppl'] - 1) * 100:+.2f}% vs first row, "
              f"greedy picks {agree * 100:.2f}% the first row's, {res['tokens']} tokens)", flush=True)


if __name__ == "__main__":
    main()
