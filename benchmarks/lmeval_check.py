"""lm-evaluation-harness against `memlm serve`, cross-checked with memlm's own computation.

Writes two local tasks (YAML + JSONL, from the packaged Shakespeare text; no hub access):
`memlm_local_mc` (multiple choice: the true rest of a line against another line's, scored by
log-likelihood through `echo=true, logprobs=1`) and `memlm_local_gen` (generate-until a
newline). Runs lm-eval's `local-completions` model (tokenizing through the server's
/tokenize, /detokenize and /tokenizer_info) on both, and `local-chat-completions` (chat
template applied by the server) on the second, against a `memlm serve` subprocess, then computes
every log-likelihood (of the exact context / continuation strings lm-eval logged) and every
generation directly with `LLM` (prompt logprobs, greedy decoding) and prints the largest
difference. Needs `make bench-setup-lmeval` (lm-eval in .venv-lmeval).

    python benchmarks/lmeval_check.py [--model smollm2-135m-instruct] [--docs 24]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_load_servers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
LM_EVAL = ROOT / ".venv-lmeval" / "bin" / "lm_eval"
NAME = "memlm"
MAX_GEN = 16


def make_docs(n: int) -> tuple[list[dict], list[dict]]:
    from memlm.training.data import load_corpus
    lines = [ln.strip() for ln in load_corpus("shakespeare")[0].text.splitlines()]
    lines = [ln for ln in lines if len(ln.split()) >= 9][: 2 * n]
    mc, gen = [], []
    for i in range(n):
        words, other = lines[i].split(), lines[(i + n) % len(lines)].split()
        # lm-eval joins context and choice with its target_delimiter, " ".
        mc.append({"context": " ".join(words[:5]), "choices": [" ".join(words[5:]), " ".join(other[5:])],
                   "label": 0})
        gen.append({"context": " ".join(words[:5]), "target": " " + " ".join(words[5:])})
    return mc, gen


def write_tasks(task_dir: Path, mc: list[dict], gen: list[dict]) -> None:
    for name, docs in (("mc", mc), ("gen", gen)):
        (task_dir / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (task_dir / "mc.yaml").write_text(
        "task: memlm_local_mc\n" + common.format(path=task_dir / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
          "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (task_dir / "gen.yaml").write_text(
        "task: memlm_local_gen\n" + common.format(path=task_dir / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: context\ndoc_to_target: target\n"
          f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")


def serve(args, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "memlm", "serve", "--model", args.model, "--port", str(port),
           "--served-model-name", NAME, "--weight-dtype", "fp32", "--kv-dtype", "fp32"]
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", str(log), 600, poll_s=0.2)
    except RuntimeError:
        raise SystemExit(f"memlm serve did not start:\n{log.read_text()}") from None
    return proc


def samples(out_dir: Path, task: str) -> list[dict]:
    files = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))
    rows = [json.loads(line) for line in files[-1].read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def encode_pair(tk, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal split (api/model.py `_encode_pair`): trailing spaces of the context move
    to the continuation; the continuation's tokens are the whole's past the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tk.encode(context + continuation), tk.encode(context)
    return ctx, whole[len(ctx):]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--memory-budget", default="2GiB")
    p.add_argument("--docs", type=int, default=24)
    args = p.parse_args()
    if not LM_EVAL.exists():
        raise SystemExit(f"{LM_EVAL} is missing: run `make bench-setup-lmeval`")
    work = Path(tempfile.mkdtemp(prefix="memlm-lmeval-"))
    mc, gen = make_docs(args.docs)
    write_tasks(work, mc, gen)
    port = free_port()
    proc = serve(args, port, work / "serve.log")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}/v1"
    try:
        t0 = time.perf_counter()
        subprocess.run([str(LM_EVAL), "run", "--model", "local-completions", "--model_args",
                        f"model={NAME},base_url={url}/completions,tokenizer_backend=remote,"
                        "num_concurrent=1,max_retries=1",
                        "--tasks", "memlm_local_mc,memlm_local_gen", "--include_path", str(work),
                        "--log_samples", "--output_path", str(work / "out"), "--batch_size", "1"],
                       check=True, env=env)
        subprocess.run([str(LM_EVAL), "run", "--model", "local-chat-completions", "--model_args",
                        f"model={NAME},base_url={url}/chat/completions,num_concurrent=1,max_retries=1",
                        "--apply_chat_template", "--tasks", "memlm_local_gen", "--include_path", str(work),
                        "--log_samples", "--output_path", str(work / "out_chat"), "--batch_size", "1"],
                       check=True, env=env)
        lm_eval_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    from memlm import LLM, SamplingParams
    llm = LLM(args.model, memory_budget=args.memory_budget, weight_dtype="fp32", kv_dtype="fp32",
              verbose=False)
    tk = llm.tokenizer
    mc_rows = samples(work / "out", "memlm_local_mc")
    scored = [(a["arg_0"], a["arg_1"]) for row in mc_rows for a in row["arguments"].values()]
    pairs = [encode_pair(tk, context, continuation) for context, continuation in scored]
    outs = llm.generate([{"prompt_token_ids": a + b} for a, b in pairs],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    direct = [sum(o.prompt_logprobs[k][tid] for k, tid in enumerate(o.prompt_token_ids) if k >= len(ctx))
              for (ctx, _), o in zip(pairs, outs)]
    served = [float(r[0][0]) for row in mc_rows for r in row["resps"]]
    diff = max(abs(x - y) for x, y in zip(served, direct))
    gens = llm.generate([{"prompt_token_ids": tk.encode(d["context"])} for d in gen],
                        SamplingParams(temperature=0, max_tokens=MAX_GEN, stop=["\n"]), use_tqdm=False)
    served_gen = [row["resps"][0][0] for row in samples(work / "out", "memlm_local_gen")]
    same = sum(a == g.outputs[0].text for a, g in zip(served_gen, gens))
    chats = llm.chat([[{"role": "user", "content": d["context"]}] for d in gen],
                     SamplingParams(temperature=0, max_tokens=MAX_GEN, stop=["\n"]), use_tqdm=False)
    served_chat = [row["resps"][0][0] for row in samples(work / "out_chat", "memlm_local_gen")]
    same_chat = sum(a == c.outputs[0].text for a, c in zip(served_chat, chats))
    acc_direct = sum(direct[2 * i] > direct[2 * i + 1] for i in range(len(mc))) / len(mc)
    acc_served = sum(served[2 * i] > served[2 * i + 1] for i in range(len(mc))) / len(mc)
    print(f"model {args.model}; {len(mc)} multiple-choice docs ({len(served)} log-likelihoods), "
          f"{len(gen)} generate-until docs; lm-eval ran {lm_eval_s:.1f} s")
    print(f"log-likelihood: max |lm-eval - direct| = {diff:.2e}; acc lm-eval {acc_served:.3f}, "
          f"direct {acc_direct:.3f}")
    print(f"generate-until: {same}/{len(gen)} identical to LLM.generate; local-chat-completions "
          f"{same_chat}/{len(gen)} identical to LLM.chat")
    ok = (len(served) == len(direct) and diff < 1e-3 and same == len(gen) == len(served_gen)
          and same_chat == len(gen) == len(served_chat))
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
