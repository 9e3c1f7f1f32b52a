"""Prefill speed with and without aligning SDPA's key count to 16 (`memlm.models.kv.KEY_ALIGN`).

torch's CPU flash-attention kernel runs markedly slower when the number of keys is not a
multiple of 16. memlm pads a first prefill chunk's K/V with zeros past every query (and later
chunks attend over whole KV blocks). This benchmark times, in one process and alternating:

- SDPA alone at a few key counts, bf16, SmolLM2's heads (9 query, 3 KV, head size 64);
- the paged engine prefilling a seeded set of SmolLM2 prompts (16-512 tokens, one output token)
  with the alignment on, and off (KEY_ALIGN = 1: no padding).

    python benchmarks/prefill.py --threads 2
"""
from __future__ import annotations

import argparse
import random
import time


def time_sdpa(T: int, dtype, repeats: int = 20) -> tuple[float, float]:
    """Seconds per call of plain SDPA and of `causal_attention` on the same causal inputs."""
    import torch
    import torch.nn.functional as F
    from memlm.models.kv import causal_attention
    q = torch.randn(1, 9, T, 64).to(dtype)
    k, v = torch.randn(1, 3, T, 64).to(dtype), torch.randn(1, 3, T, 64).to(dtype)
    plain = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    ours = lambda: causal_attention(q, k, v)  # noqa: E731
    out = []
    for fn in (plain, ours):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        out.append((time.perf_counter() - t) / repeats)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="aligned/unaligned pairs")
    args = ap.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from memlm import LLM, SamplingParams
    from memlm.models import kv

    print(f"threads {torch.get_num_threads()}; SDPA causal, bf16, 9/3 heads, head size 64 (ms):")
    for T in (255, 256, 333, 336, 477, 480, 511, 512):
        plain, ours = time_sdpa(T, torch.bfloat16)
        print(f"  {T:4d} keys: SDPA {plain * 1e3:.2f} | causal_attention (aligned) {ours * 1e3:.2f}")

    llm = LLM("smollm2-135m-instruct", memory_budget="2GiB", verbose=False)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(rng.randint(16, 512))]}
               for _ in range(args.prompts)]
    n = sum(len(p["prompt_token_ids"]) for p in prompts)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:8], sp, use_tqdm=False)                      # warm-up
    rates = {16: [], 1: []}
    for _ in range(args.rounds):
        for align in (16, 1):
            kv.KEY_ALIGN = align
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            rates[align].append(n / (time.perf_counter() - t))
    kv.KEY_ALIGN = 16
    best = {a: max(r) for a, r in rates.items()}
    print(f"prefill of {len(prompts)} prompts, {n} tokens (tok/s, each round): aligned "
          f"{', '.join(f'{r:.0f}' for r in rates[16])} | unaligned {', '.join(f'{r:.0f}' for r in rates[1])}"
          f" | best aligned / best unaligned = {best[16] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
