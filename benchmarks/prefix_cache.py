"""Prefix caching: time to first token cold vs warm, and cost-aware eviction vs plain LRU.

(a) TTFT: the embedded SmolLM2, a ~1,000-token system prompt (Shakespeare text) followed by a
    short user turn, max_tokens=1, greedy, one request at a time. "cold": a system prompt the
    cache has never seen (a different slice of text each time); "warm": a system prompt served
    once before, with a new user turn. Alternated, medians over --reps; same process, so only
    the ratio means anything (the machine is shared and noisy).
(b) Hit rate at the same small KV pool on a mixed workload: a few hot system prompts (each
    followed by a short user turn) mixed with many one-off prompts. First replayed through the
    `KVCacheManager` alone (the block trace: admit at the cached prefix, compute the prompt and
    the reply, free; no model), over several pool sizes; then one real engine run per policy
    (SmolLM2, all requests submitted at once) with its hit rate and throughput, and the same
    run with the cache off.

(c) Tiers on vs off: the mixed workload one request at a time (max_tokens=1) on a small pool,
    alternating two engines request by request at the same KV bytes — "off": --tiers-blocks
    hot blocks, evicted cached blocks dropped; "on": 1 - --warm-fraction of those blocks, plus a
    warm tier capped at the bytes of the blocks it gave up, where evicted cached blocks that were
    reused wait compressed (kv/prefix_tier.py). TTFT median / mean / p90 of each (target: on
    never worse).

    PYTHONPATH=. python benchmarks/prefix_cache.py       # (a) + (b) replay + (b) engine
    PYTHONPATH=. python benchmarks/prefix_cache.py --parts tiers --tiers-requests 40 --threads 1
    PYTHONPATH=. python benchmarks/prefix_cache.py --parts replay   # replay only (seconds)
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from memlm.kv.manager import KVCacheManager
from memlm.kv.prefix_cache import PrefixCache
from memlm.kv.prefix_eviction import make_policy

BLOCK = 16
HIDDEN = 576                     # SmolLM2-135M: the cost policy's attention scale is 6 x hidden


class TraceSeq:
    def __init__(self, seq_id, tokens):
        self.seq_id, self.tokens, self.num_computed_tokens = seq_id, tokens, 0

    def token_ids_slice(self, a, b):
        return self.tokens[a:b]


def workload(n, hot, hot_len, one_off_len, hot_share, out_len, seed):
    """(prompt ids, reply ids) pairs: hot system prompt + user turn, or a one-off prompt."""
    rng = random.Random(seed)
    systems = [[rng.randrange(50_000) for _ in range(hot_len)] for _ in range(hot)]
    reqs = []
    for _ in range(n):
        if rng.random() < hot_share:
            prompt = rng.choice(systems) + [rng.randrange(50_000) for _ in range(rng.randint(16, 48))]
        else:
            prompt = [rng.randrange(50_000) for _ in range(rng.randint(*one_off_len))]
        reqs.append((prompt, [rng.randrange(50_000) for _ in range(out_len)]))
    return reqs


def replay(reqs, num_blocks, policy):
    """Serve each request start to end through a KVCacheManager; returns the token hit rate."""
    kv = KVCacheManager(num_blocks, BLOCK, PrefixCache(BLOCK, make_policy(policy, BLOCK, 6.0 * HIDDEN)))
    for i, (prompt, reply) in enumerate(reqs):
        seq = TraceSeq(i, prompt)
        hit = kv.find_cached_prefix(seq, len(prompt))
        cached = hit.num_blocks * BLOCK
        if not kv.allocate_slots(seq, len(prompt) - cached, hit):
            raise SystemExit(f"pool of {num_blocks} blocks cannot hold a {len(prompt)}-token prompt")
        seq.num_computed_tokens = len(prompt)
        kv.cache_computed_blocks(seq)
        seq.tokens = prompt + reply
        assert kv.allocate_slots(seq, len(reply))
        seq.num_computed_tokens = len(seq.tokens)
        kv.cache_computed_blocks(seq)
        kv.free(seq)
    return kv.cache.hit_rate


def run_replay(args):
    reqs = workload(args.requests, args.hot, args.hot_len, (args.one_off_min, args.one_off_max),
                    args.hot_share, args.out_len, args.seed)
    print(f"(b) replay: {len(reqs)} requests, {args.hot} hot system prompts of {args.hot_len} tokens "
          f"({args.hot_share:.0%} of requests) + one-off prompts of {args.one_off_min}-{args.one_off_max} "
          f"tokens, {args.out_len}-token replies, block {BLOCK}")
    print("  pool blocks | LRU hit rate | cost hit rate | cost / LRU")
    for blocks in args.pools:
        lru, cost = replay(reqs, blocks, "lru"), replay(reqs, blocks, "cost")
        ratio = f"{cost / lru:.2f}x" if lru else "inf"
        print(f"  {blocks:11d} | {lru:12.1%} | {cost:13.1%} | {ratio}")


def system_text(llm, n_tokens, start_doc):
    from memlm.training.data import load_corpus
    docs = load_corpus("shakespeare")
    ids = llm.tokenizer.encode(docs[start_doc % len(docs)].text[20_000:80_000])
    return ids[:n_tokens]


def ttft(llm, ids):
    from memlm import SamplingParams
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return time.perf_counter() - start


def run_ttft(args):
    from memlm import LLM
    llm = LLM("smollm2-135m-instruct", verbose=False, max_num_seqs=4, num_kv_blocks=512,
              num_threads=args.threads)
    user = llm.tokenizer.encode("\nUser: what is this passage about? Answer briefly.\nAssistant:")
    warm_system = system_text(llm, args.system_tokens, 0)
    ttft(llm, warm_system + user)                         # warm-up + caches the warm system prompt
    cold, warm = [], []
    for r in range(args.reps):
        cold.append(ttft(llm, system_text(llm, args.system_tokens, r + 1) + user))
        turn = llm.tokenizer.encode(f"\nUser: question {r}: who speaks first?\nAssistant:")
        warm.append(ttft(llm, warm_system + turn))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"(a) TTFT, {len(warm_system) + len(user)}-token prompt ({len(warm_system)}-token system prompt), "
          f"{args.reps} reps alternating: cold {c * 1000:.1f} ms, warm {w * 1000:.1f} ms, "
          f"cold / warm {c / w:.1f}x (target >= 5x: {'met' if c / w >= 5 else 'NOT met'})")
    print(f"    {llm.metrics.prefix_cache_hits} of {llm.metrics.prefix_cache_queries} prompt tokens hit")


def run_engine(args):
    from memlm import LLM, SamplingParams
    reqs = workload(args.engine_requests, args.hot, args.hot_len, (args.one_off_min, args.one_off_max),
                    args.hot_share, args.out_len, args.seed + 1)
    prompts = [{"prompt_token_ids": [t % 49_000 for t in p]} for p, _ in reqs]
    sp = SamplingParams(temperature=0, max_tokens=args.out_len, ignore_eos=True)
    print(f"(b) engine: SmolLM2, {len(prompts)} requests at once, pool {args.engine_blocks} blocks, "
          f"max_num_seqs {args.engine_seqs}")
    outs = {}
    for name, kw in (("off", dict(enable_prefix_caching=False)), ("lru", dict(prefix_cache_policy="lru")),
                     ("cost", dict(prefix_cache_policy="cost"))):
        llm = LLM("smollm2-135m-instruct", verbose=False, max_num_seqs=args.engine_seqs,
                  num_kv_blocks=args.engine_blocks, num_threads=args.threads, **kw)
        start = time.perf_counter()
        out = llm.generate(prompts, sp, use_tqdm=False)
        secs = time.perf_counter() - start
        m = llm.metrics
        outs[name] = [o.outputs[0].token_ids for o in out]
        toks = sum(len(p["prompt_token_ids"]) for p in prompts) + len(prompts) * args.out_len
        print(f"  cache {name:4s}: hit rate {m.prefix_cache_hit_rate:6.1%}, {m.prefix_cache_evictions} "
              f"evictions, {m.num_preemptions} preemptions, {secs:6.1f} s, {toks / secs:7.1f} tok/s "
              f"(prompt + output)")
        del llm
    same = sum(a == b for a, b in zip(outs["off"], outs["cost"]))
    print(f"  greedy outputs identical to cache off: lru {sum(a == b for a, b in zip(outs['off'], outs['lru']))}"
          f"/{len(prompts)}, cost {same}/{len(prompts)}")


def run_tiers(args):
    from memlm import LLM
    reqs = workload(args.tiers_requests, args.hot, args.hot_len, (args.one_off_min, args.one_off_max),
                    args.hot_share, 1, args.seed + 2)
    prompts = [[t % 49_000 for t in p] for p, _ in reqs]
    on_blocks = int(args.tiers_blocks * (1 - args.warm_fraction))
    llms = {"off": LLM("smollm2-135m-instruct", verbose=False, max_num_seqs=1, num_kv_blocks=args.tiers_blocks,
                       num_threads=args.threads),
            "on": LLM("smollm2-135m-instruct", verbose=False, max_num_seqs=1, num_kv_blocks=on_blocks,
                      warm_fraction=args.warm_fraction, num_threads=args.threads)}
    warm = llms["on"].engine.offload.warm       # same KV bytes: the blocks "on" gave up, no more
    warm.capacity = min(warm.capacity, (args.tiers_blocks - on_blocks) * llms["on"].engine.plan.block_bytes)
    print(f"(c) tiers: SmolLM2, {len(prompts)} requests one at a time, {args.hot} hot prompts of "
          f"{args.hot_len} tokens ({args.hot_share:.0%}), one-offs {args.one_off_min}-{args.one_off_max}; "
          f"off: {args.tiers_blocks} blocks; on: {on_blocks} blocks + a warm tier of "
          f"{warm.capacity / 2**20:.1f} MiB (the same KV bytes)")
    for llm in llms.values():
        ttft(llm, prompts[0][:64])                       # warm-up
    times = {name: [] for name in llms}
    for i, p in enumerate(prompts):
        for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
            times[name].append(ttft(llms[name], p))
    print("  tiers | TTFT median ms | mean ms | p90 ms | hit rate | evictions | demoted | restored blocks")
    stats = {}
    for name, llm in llms.items():
        t = sorted(times[name])
        m = llm.metrics
        stats[name] = (statistics.median(t), statistics.mean(t))
        print(f"  {name:5s} | {stats[name][0] * 1e3:14.1f} | {stats[name][1] * 1e3:7.1f} | "
              f"{t[int(0.9 * (len(t) - 1))] * 1e3:6.1f} | {m.prefix_cache_hit_rate:8.1%} | "
              f"{m.prefix_cache_evictions:9d} | {m.prefix_tier_demotions:7d} | {m.prefix_tier_restored_blocks}")
    print(f"  warm tier held {llms['on'].metrics.warm_bytes / 2**20:.1f} MiB at the end "
          f"(one hot block: {llms['on'].engine.plan.block_bytes / 2**20:.2f} MiB)")
    ratio_med, ratio_mean = stats["on"][0] / stats["off"][0], stats["on"][1] / stats["off"][1]
    print(f"  on / off: median {ratio_med:.3f}, mean {ratio_mean:.3f} (target: on never worse)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--hot", type=int, default=4)
    ap.add_argument("--hot-len", type=int, default=400)
    ap.add_argument("--hot-share", type=float, default=0.3)
    ap.add_argument("--one-off-min", type=int, default=200)
    ap.add_argument("--one-off-max", type=int, default=600)
    ap.add_argument("--out-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pools", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 192, 256, 512])
    ap.add_argument("--engine-requests", type=int, default=24)
    ap.add_argument("--engine-blocks", type=int, default=160)
    ap.add_argument("--engine-seqs", type=int, default=2)
    ap.add_argument("--tiers-requests", type=int, default=60)
    ap.add_argument("--tiers-blocks", type=int, default=80)
    ap.add_argument("--warm-fraction", type=float, default=0.25)
    ap.add_argument("--parts", default="replay,ttft,engine,tiers",
                    help="comma-separated: replay (no model, seconds), ttft, engine, tiers (default: all)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    known = {"replay", "ttft", "engine", "tiers"}
    if parts - known:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(sorted(parts - known))}")
    if "replay" in parts:
        run_replay(args)
    if "ttft" in parts:
        run_ttft(args)
    if "engine" in parts:
        run_engine(args)
    if "tiers" in parts:
        run_tiers(args)


if __name__ == "__main__":
    main()
