"""Quality and size of each KV codec: perplexity of the embedded SmolLM2 through the paged engine
(`memlm.entrypoints.evaluate`, what `memlm eval` runs) with fp32 weights, so the KV codec is the
only difference between rows, and the bytes each codec stores per token, measured from the
store's tensors (codes, scales, the int4 / int2 fp16 window and its stage map).

Text: held-out files of the Python 3.11 documentation (Debian `python3.11-doc`; `make data`
installs it). Nothing in memlm was tuned on them: the codecs' group sizes are fixed a priori
(keys per block of 16 tokens, values per 64 channels for int4, 32 for int2). Windows of
--context tokens, prefilled --chunk tokens per step: every chunk after a window's first
attends to K/V read back from the cache in its codec.

    PYTHONPATH=. python benchmarks/kv_quality.py [--context 1024] [--chunk 256] [--tokens 8192] [--threads 2]

Prints one line per codec (perplexity, increase vs fp32 KV, bytes per token, ratio vs fp32) and
the targets of issue 13 (int8 <= 0.5%, int4 <= 3% increase; int8 >= 3.5x, int4 >= 6x smaller).
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
FILES = ["tutorial/datastructures.rst.txt", "library/itertools.rst.txt", "reference/datamodel.rst.txt",
         "howto/logging.rst.txt"]
CODECS = ["fp32", "fp16", "int8", "int4", "int2"]
SERVING_SEQS = 128      # the engine's default max_num_seqs: the window a server keeps


def held_out_ids(tokenizer, tokens: int) -> list[int]:
    missing = [f for f in FILES if not (DOCS / f).is_file()]
    if missing:
        raise SystemExit(f"error: {DOCS / missing[0]} is missing; run `make data` (python3.11-doc)")
    ids: list[int] = []
    for f in FILES:
        ids += tokenizer.encode((DOCS / f).read_text(encoding="utf-8"))
        if len(ids) >= tokens:
            break
    return ids[:tokens]


def measure(kv: str, args) -> dict:
    from memlm.entrypoints import evaluate
    from memlm.kv.store import KVStore
    llm = evaluate.eval_llm("smollm2-135m-instruct", chunk=args.chunk, memory_budget=args.budget,
                            weight_dtype="fp32", kv_dtype=kv, num_threads=args.threads)
    ids = held_out_ids(llm.tokenizer, args.tokens)
    t0 = time.perf_counter()
    r = evaluate.perplexity(llm, ids, context=args.context)
    seconds = time.perf_counter() - t0
    store = llm.engine.runner.store
    slots = store.num_blocks * store.block_size
    # the same pool with a server's window (one stage per sequence), built to be measured
    serving = KVStore(tuple(store.layer_of_depth), store.num_blocks, store.block_size, store.n_kv_heads,
                      store.head_dim, kv, window_stages=SERVING_SEQS + 1)
    out = {"kv_dtype": kv, "perplexity": r.perplexity, "tokens": r.tokens, "windows": r.windows,
           "seconds": seconds, "pool_tokens": slots,
           "bytes_per_token": store.nbytes / slots,                 # pool + this engine's window
           "pool_bytes_per_token": store.codec.nbytes / slots,      # codes + scales only
           "serving_bytes_per_token": serving.nbytes / slots,       # pool + a 129-stage window
           "num_layers": len(store.layer_of_depth)}
    del llm, store, serving
    gc.collect()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored per codec")
    p.add_argument("--budget", default="2GiB")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="*", default=CODECS)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    rows = [measure(kv, args) for kv in ["fp32", *[c for c in args.only if c != "fp32"]]]
    base = rows[0]
    print(f"SmolLM2-135M-Instruct, fp32 weights, {base['tokens']} held-out tokens ({base['windows']} windows "
          f"of {args.context}, chunk {args.chunk}), KV pool of {base['pool_tokens']} tokens")
    print(f"{'kv':<6}{'ppl':>10}{'vs fp32':>10}{'B/token':>10}{'x fp32':>8}{'pool B/t':>10}{'serving B/t':>13}"
          f"{'x fp32':>8}{'s':>8}")
    for r in rows:
        inc = r["perplexity"] / base["perplexity"] - 1
        print(f"{r['kv_dtype']:<6}{r['perplexity']:>10.4f}{inc:>+10.3%}{r['bytes_per_token']:>10.1f}"
              f"{base['bytes_per_token'] / r['bytes_per_token']:>8.2f}{r['pool_bytes_per_token']:>10.1f}"
              f"{r['serving_bytes_per_token']:>13.1f}"
              f"{base['serving_bytes_per_token'] / r['serving_bytes_per_token']:>8.2f}{r['seconds']:>8.1f}")
    by = {r["kv_dtype"]: r for r in rows}
    checks = [("int8 ppl increase <= 0.5%", "int8", lambda r: r["perplexity"] / base["perplexity"] - 1 <= 0.005),
              ("int4 ppl increase <= 3%", "int4", lambda r: r["perplexity"] / base["perplexity"] - 1 <= 0.03),
              ("int8 >= 3.5x fewer bytes/token", "int8", lambda r: base["bytes_per_token"] / r["bytes_per_token"] >= 3.5),
              ("int4 >= 6x fewer bytes/token", "int4", lambda r: base["bytes_per_token"] / r["bytes_per_token"] >= 6)]
    for label, kv, ok in checks:
        if kv in by:
            print(f"target {label}: {'met' if ok(by[kv]) else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
