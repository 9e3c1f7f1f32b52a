"""Single-stream decode: memlm at each weight dtype vs HF transformers, one request at a time.

The embedded SmolLM2, batch 1, greedy, a 32-token prompt and 256 new tokens (ignore_eos), 2
threads. Every engine runs in its own subprocess (peak RSS from the kernel through wait4),
one after another in the same invocation, after a short warm-up generation in the same process.
Decode tok/s counts the tokens after the first over the time after the first; time to first
token (TTFT) is the prompt's prefill plus the first token. CPU ms/token is the process's user +
system CPU time over those decode tokens (getrusage): less sensitive to other processes' load
than wall time, and at `--threads 1` the cleanest comparison on a shared machine (with more
threads it includes OpenMP / ggml threads spinning at barriers). llama.cpp (llama-cpp-python in
.venv-llamacpp, `make bench-setup-llamacpp`) runs the embedded Q4_1 file and Q8_0 / F16 copies of
the same weights written with the `gguf` package (cached under ~/.cache/memlm/bench), each
against memlm at equal precision: int4 (the file's Q4_1 blocks kept), int8 on the Q8_0 copy
(its blocks kept), bf16 on the F16 copy.

    python benchmarks/single_stream.py                       # memlm fp32 bf16 int8 int4 g32/g128 + hf
    python benchmarks/single_stream.py --engines int8,int4 --new-tokens 64
    python benchmarks/single_stream.py --min-budget           # + the smallest budget per weight dtype

memlm runs with `--memory-budget` (default 1GiB), a KV pool capped at 32 blocks (512 tokens,
room for the prompt and the reply), like a llama.cpp context of 512, and steps of at most
`--batch-tokens` (512) tokens, like llama-cpp-python's n_batch: the engine's start-up profile
of its largest step is most of the peak RSS (2048-token steps: +144 MiB measured).
`--min-budget` bisects, for `--weight-dtype auto` (the file's Q4_1 blocks) and each memlm weight
dtype listed, the smallest `--memory-budget` (to 16 MiB) with which `memlm generate --chat`
completes a short reply (a small budget runs smaller steps: `memlm/engine/config.step_candidates`).
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

from worker_process import run_json_worker

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type with an oil-based ink and a screw press, and")
ENGINES = {  # name -> (kind, weight dtype | GGUF copy, int4 group size)
    "fp32": ("memlm", "fp32", None), "bf16": ("memlm", "bf16", None), "int8": ("memlm", "int8", None),
    "int4": ("memlm", "int4", 32), "int4-g128": ("memlm", "int4", 128), "hf": ("hf", "fp32", None),
    "int8-q8_0": ("memlm", "int8", "Q8_0"), "llamacpp-q4_1": ("llamacpp", "Q4_1", None),
    "llamacpp-q8_0": ("llamacpp", "Q8_0", None), "llamacpp-f16": ("llamacpp", "F16", None),
}
PAIRS = [("int4", "llamacpp-q4_1"), ("int8-q8_0", "llamacpp-q8_0"), ("bf16", "llamacpp-f16")]
LLAMACPP_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
COPIES = Path(os.path.expanduser("~")) / ".cache" / "memlm" / "bench"


def writer_like(reader, tmp: Path):
    """A GGUFWriter at `tmp` (COPIES made) holding every metadata key of `reader`'s file."""
    import gguf
    COPIES.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    return w


def gguf_copy(qtype: str) -> Path:
    """The embedded SmolLM2 GGUF (Q4_1) itself, or its weights rewritten as `qtype` (Q8_0 / F16;
    norms stay F32), every metadata key copied; written once and cached."""
    sys.path.insert(0, str(ROOT))
    from memlm.models.registry import resolve_preset
    src = resolve_preset("smollm2-135m-instruct")
    if qtype == "Q4_1":
        return src
    out = COPIES / f"{src.stem}.{qtype}.gguf"
    if out.exists():
        return out
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T
    reader = gguf.GGUFReader(str(src))
    tmp = out.with_suffix(".tmp")
    w = writer_like(reader, tmp)
    target = T[qtype]
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        kind = target if data.ndim == 2 else T.F32
        packed = data.astype(np.float16) if kind == T.F16 else gguf.quants.quantize(data, kind)
        w.add_tensor(t.name, packed, raw_dtype=kind if kind not in (T.F32, T.F16) else None)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    os.replace(tmp, out)
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def llamacpp_worker(args) -> dict:
    """Runs in .venv-llamacpp's python (no torch, no memlm): greedy, streamed, same prompt."""
    from llama_cpp import Llama
    llm = Llama(model_path=args.gguf, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)[:args.prompt_tokens]
    for _ in llm.create_completion(ids, max_tokens=8, temperature=0, stream=True):
        pass
    llm.reset()
    start, first, n = time.perf_counter(), None, 0
    for _ in llm.create_completion(ids, max_tokens=args.new_tokens, temperature=0, stream=True,
                                   logit_bias={llm.token_eos(): -1e9}):
        n += 1
        if first is None:
            first, cpu0 = time.perf_counter(), cpu_seconds()
    end, cpu1 = time.perf_counter(), cpu_seconds()
    return {"ttft": first - start, "decode_tok_s": (n - 1) / (end - first), "tokens": n,
            "cpu_ms": (cpu1 - cpu0) / (n - 1) * 1e3}


def memlm_worker(args) -> dict:
    from memlm import LLM, SamplingParams
    _, weight_dtype, group = ENGINES[args.worker]
    model = str(gguf_copy(group)) if isinstance(group, str) else "smollm2-135m-instruct"
    group = group if isinstance(group, int) else None
    llm = LLM(model, memory_budget=args.budget, verbose=False, weight_dtype=weight_dtype,
              weight_group_size=group, num_threads=args.threads, max_num_seqs=1, num_kv_blocks=32,
              max_num_batched_tokens=args.batch_tokens)
    ids = llm.tokenizer.encode(PROMPT)[:args.prompt_tokens]
    llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    start, first, n = time.perf_counter(), None, 0
    for chunk in llm.stream({"prompt_token_ids": ids}, params):
        n += len(chunk.token_ids)
        if first is None:
            first, cpu0 = time.perf_counter(), cpu_seconds()
    end, cpu1 = time.perf_counter(), cpu_seconds()
    return {"ttft": first - start, "decode_tok_s": (n - 1) / (end - first), "tokens": n,
            "weight_bytes": llm.loaded.weight_bytes, "cpu_ms": (cpu1 - cpu0) / (n - 1) * 1e3}


def hf_worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import hf_dir
    torch.set_num_threads(args.threads)
    path = hf_dir("smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer.json").exists() else None
    from memlm.loading import load_model
    ids = (tok(PROMPT)["input_ids"] if tok is not None else
           load_model("smollm2-135m-instruct").tokenizer.encode(PROMPT))[:args.prompt_tokens]
    x = torch.tensor([ids])

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t
    run(8)
    ttft, total = run(1), run(args.new_tokens)
    return {"ttft": ttft, "decode_tok_s": (args.new_tokens - 1) / (total - ttft), "tokens": args.new_tokens}


def run_engine(name: str, args) -> dict:
    kind, qtype, _ = ENGINES[name]
    python, extra = sys.executable, []
    if kind == "llamacpp":
        if not LLAMACPP_PYTHON.exists():
            return {"error": f"{LLAMACPP_PYTHON} is missing: run `make bench-setup-llamacpp`"}
        python, extra = str(LLAMACPP_PYTHON), ["--gguf", str(gguf_copy(qtype))]
    cmd = [python, __file__, "--worker", name, "--threads", str(args.threads), "--budget", args.budget,
           "--batch-tokens", str(args.batch_tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    return run_json_worker(cmd, env)


def completes(weight_dtype: str, group, budget_mib: int) -> bool:
    """Does `memlm generate --chat` finish a short reply inside `budget_mib`?"""
    cmd = [sys.executable, "-m", "memlm", "generate", "--chat", "What is the capital of France?",
           "--max-tokens", "16", "--memory-budget", f"{budget_mib}MiB", "--weight-dtype", weight_dtype]
    if group:
        cmd += ["--weight-group-size", str(group)]
    return subprocess.run(cmd, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode == 0


def min_budget(weight_dtype: str, group, lo: int = 256, hi: int = 2048) -> int | None:
    """Smallest budget in MiB (to 16 MiB) that completes a reply, or None if even `hi` fails."""
    if not completes(weight_dtype, group, hi):
        return None
    while hi - lo > 16:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if completes(weight_dtype, group, mid) else (mid, hi)
    return hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default="1GiB", help="memlm's --memory-budget (default %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=512,
                    help="memlm's max_num_batched_tokens (default %(default)s = llama-cpp-python's n_batch)")
    ap.add_argument("--min-budget", action="store_true", help="also bisect the smallest budget per dtype")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--write-copy", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_copy:
        print(gguf_copy(args.write_copy))
        return
    if args.worker:
        kind = ENGINES[args.worker][0]
        res = {"hf": hf_worker, "llamacpp": llamacpp_worker, "memlm": memlm_worker}[kind](args)
        print(json.dumps(res))
        return
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    bad = [n for n in names if n not in ENGINES]
    if bad:
        sys.exit(f"error: unknown engine {bad[0]!r}; choose from {', '.join(ENGINES)}")
    print(f"# single stream: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, "
          f"{args.threads} threads", flush=True)
    # The GGUF copies are written by a child: a worker forked after this process had grown would
    # report this process's peak (Linux carries the pre-exec high-water mark into ru_maxrss).
    for qtype in sorted({ENGINES[n][1] for n in names if ENGINES[n][0] == "llamacpp"} |
                        {ENGINES[n][2] for n in names if isinstance(ENGINES[n][2], str)}):
        subprocess.run([sys.executable, __file__, "--write-copy", qtype], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    runs: list[tuple[str, dict]] = []           # an engine listed twice keeps both runs
    for name in names:
        r = run_engine(name, args)
        runs.append((name, r))
        if "error" in r:
            print(f"  {name:<13} {r['error']}", flush=True)
            continue
        cpu = f"  cpu {r['cpu_ms']:5.2f} ms/token" if "cpu_ms" in r else ""
        print(f"  {name:<13} decode {r['decode_tok_s']:7.1f} tok/s{cpu}  ttft {r['ttft'] * 1000:6.1f} ms  "
              f"peak RSS {r['peak_rss'] / 2**20:6.0f} MiB" +
              (f"  weights {r['weight_bytes'] / 2**20:.0f} MiB" if "weight_bytes" in r else ""), flush=True)
    def ratio(a: str, b: str) -> None:
        """a / b per run of a: against b's run of the same index where both ran equally often
        (alternated runs, so each pair saw the same host speed, which moves between runs here),
        else against the mean of b's runs (every run of each is printed above)."""
        ok_a = [r for n, r in runs if n == a and "error" not in r]
        ok_b = [r for n, r in runs if n == b and "error" not in r]
        if not ok_b:
            return
        def mean(rs: list[dict]) -> dict:
            return {k: sum(r.get(k, 0.0) for r in rs) / len(rs) for k in ("decode_tok_s", "peak_rss", "ttft", "cpu_ms")}
        paired = len(ok_a) == len(ok_b)
        for i, r in enumerate(ok_a):
            o = mean([ok_b[i]] if paired else ok_b)
            cpu_ratio = (f"cpu per token {o['cpu_ms'] / r['cpu_ms']:.2f}x (theirs / ours), "
                         if o["cpu_ms"] and "cpu_ms" in r else "")
            against = f"{b} run {i + 1}" if paired and len(ok_b) > 1 else b if paired else f"{b} (mean)"
            print(f"  {a}{f' (run {i + 1})' if len(ok_a) > 1 else ''} / {against}: decode "
                  f"{r['decode_tok_s'] / o['decode_tok_s']:.2f}x, {cpu_ratio}ttft {r['ttft'] / o['ttft']:.2f}x, "
                  f"peak RSS {r['peak_rss'] / o['peak_rss']:.2f}x", flush=True)
    for name in dict.fromkeys(names):
        if name != "bf16" and not name.startswith("llamacpp"):
            ratio(name, "bf16")
    for ours, theirs in PAIRS:
        if ours in names and theirs in names:
            ratio(ours, theirs)
    if args.min_budget:     # auto: the embedded file's own Q4_1 blocks; then each memlm dtype listed
        todo = {"auto": ("auto", None)}
        for name in names:
            kind, weight_dtype, group = ENGINES[name]
            if kind == "memlm" and not isinstance(group, str):
                todo.setdefault(name, (weight_dtype, group))
        for name, (weight_dtype, group) in todo.items():
            found = min_budget(weight_dtype, group)
            print(f"  smallest budget completing a chat reply, {name}: "
                  f"{f'{found} MiB' if found else 'over 2048 MiB'}", flush=True)


if __name__ == "__main__":
    main()
