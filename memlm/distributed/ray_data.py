"""Ray Data batch inference with memlm: a callable class for `Dataset.map_batches` and the
driver side of `memlm generate --prompts-file F --ray --actors N`.

Owns: `MemlmPredictor` (one per Ray Data actor: loads an `LLM` inside its own memory budget
once, then generates — or scores, the log-probabilities of given continuations — each batch
it is handed), the batch's column layout, and `generate_rows` (prompts in, the JSONL rows of
`memlm generate` out, in the input order).
Does not know: files or flags (`cli/generate.py`); how a batch is generated
(`memlm.entrypoints.batch`, the same code `memlm generate` runs without Ray).

Columns. generate: "prompt" (text; "" when "messages" is given), optional "messages" (a JSON
chat message list, "" for none) and "params" (JSON SamplingParams fields, "" for the actor's
defaults). It adds "text", "token_ids", "finish_reason", "error" ("" when none) and "row"
(the JSONL row of `memlm generate`, as JSON). score: "prompt" and "continuation"; it adds
"logprob" (sum over the continuation's tokens), "num_tokens" and "is_greedy" (every
continuation token was the argmax).
"""
from __future__ import annotations

import dataclasses
import json
import math

from memlm.errors import MemlmError

INSTALL_HINT = "pip install 'memlm[distributed]'"
MAX_DEFAULT_BATCH = 64
MODES = ("generate", "score")


def require_ray_data():
    """The `ray` module with Ray Data, or a one-line MemlmError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MemlmError(f"--ray needs Ray Data ({e.name} is not installed): {INSTALL_HINT}") from e
    return ray


def params_json(params) -> str:
    """A SamplingParams as the JSON of its fields (the "params" column)."""
    return json.dumps({f.name: getattr(params, f.name) for f in dataclasses.fields(params)})


class MemlmPredictor:
    """`ds.map_batches(MemlmPredictor, fn_constructor_kwargs={...}, concurrency=N,
    batch_size=B, num_cpus=C)`: each Ray Data actor builds one of these.

    Args:
        model, memory_budget, **engine: `memlm.LLM` keywords (the budget bounds this actor's
            whole process); max_num_seqs defaults to the batch size.
        mode: "generate" or "score" (see the module docstring for the columns).
        sampling: default SamplingParams fields for rows without "params" (generate).
        chat: wrap text prompts in the chat template, as `memlm generate --chat`.
        num_threads: torch threads of this actor (default 1).
        batch_size: the map_batches batch size, to size the engine (sequences at once).
    """

    def __init__(self, model=None, memory_budget=None, mode: str = "generate",
                 sampling: dict | None = None, chat: bool = False, num_threads: int = 1,
                 batch_size: int | None = None, **engine):
        import torch

        from memlm.entrypoints.llm import LLM
        from memlm.models.registry import DEFAULT_MODEL
        from memlm.sampling import SamplingParams
        if mode not in MODES:
            raise MemlmError(f"mode must be one of {MODES}, got {mode!r}")
        torch.set_num_threads(num_threads)
        self.mode, self.chat = mode, chat
        self.defaults = SamplingParams(**(sampling or {"temperature": 0.0}))
        if batch_size is not None and "max_num_seqs" not in engine:
            engine["max_num_seqs"] = max(1, batch_size)
        self.llm = LLM(model=model or DEFAULT_MODEL, memory_budget=memory_budget,
                       num_threads=num_threads, **engine)

    def __call__(self, batch: dict) -> dict:
        return self._generate(batch) if self.mode == "generate" else self._score(batch)

    def _generate(self, batch: dict) -> dict:
        from memlm.entrypoints.batch import output_row, run_prompts
        from memlm.sampling import SamplingParams
        n = len(batch["prompt"])
        messages = batch.get("messages", [""] * n)
        raw_params = batch.get("params", [""] * n)
        prompts = [json.loads(m) if m else str(p) for p, m in zip(batch["prompt"], messages)]
        params = [SamplingParams(**json.loads(p)) if p else self.defaults for p in raw_params]
        rows = [output_row(p, o) for p, o in
                zip(prompts, run_prompts(self.llm, prompts, params, self.chat, use_tqdm=False))]
        return {**batch, "text": [r["text"] for r in rows],
                "token_ids": [r["token_ids"] for r in rows],
                "finish_reason": [r["finish_reason"] or "" for r in rows],
                "error": [r.get("error", "") for r in rows],
                "row": [json.dumps(r, ensure_ascii=False) for r in rows]}

    def _score(self, batch: dict) -> dict:
        from memlm.sampling import SamplingParams
        tk = self.llm.tokenizer
        items, spans = [], []
        for prompt, cont in zip(batch["prompt"], batch["continuation"]):
            context, target = tk.encode(str(prompt)), tk.encode(str(cont))
            if not context or not target:
                raise MemlmError("score mode needs a non-empty prompt and continuation in every row")
            items.append({"prompt_token_ids": context + target})
            spans.append((len(context), target))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outs = self.llm.generate(items, params, use_tqdm=False)
        logprob, greedy = [], []
        for o, (start, target) in zip(outs, spans):
            if o.error:
                raise MemlmError(f"scoring failed: {o.error}")
            total, is_greedy = 0.0, True
            for pos, token in enumerate(target, start):
                dist = o.prompt_logprobs[pos]
                total += dist[token]
                is_greedy = is_greedy and dist[token] >= max(dist.values())
            logprob.append(total)
            greedy.append(is_greedy)
        return {**batch, "logprob": logprob, "num_tokens": [len(t) for _, t in spans],
                "is_greedy": greedy}


def _start(address: str | None, ray):
    if ray.is_initialized():
        return
    import os
    if address is None:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        return
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError) as e:
        raise MemlmError(f"cannot join the Ray cluster at {address}: {e}; start it with "
                         "`ray start --head` or drop --ray-address to run a local one") from e


def generate_rows(prompts: list, params: list, engine: dict, chat: bool = False, actors: int | None = None,
                  batch_size: int | None = None, actor_cpus: float = 1.0,
                  address: str | None = None) -> list[dict]:
    """The JSONL rows of `memlm generate --prompts-file` for `prompts` under `params`, computed
    by `actors` Ray Data actors (each an `LLM(**engine)`), in the input order."""
    ray = require_ray_data()
    actors = 1 if actors is None else actors
    if actors < 1:
        raise MemlmError(f"--actors must be >= 1, got {actors}")
    if batch_size is not None and batch_size < 1:
        raise MemlmError(f"--batch-size must be >= 1, got {batch_size}")
    if actor_cpus <= 0:
        raise MemlmError(f"--actor-cpus must be > 0, got {actor_cpus}")
    if batch_size is None:
        batch_size = max(1, min(MAX_DEFAULT_BATCH, math.ceil(len(prompts) / actors)))
    items = [{"index": i, "prompt": p if isinstance(p, str) else "",
              "messages": "" if isinstance(p, str) else json.dumps(p), "params": params_json(q)}
             for i, (p, q) in enumerate(zip(prompts, params))]
    engine = dict(engine)
    num_seqs = batch_size * max(q.n for q in params)
    if "max_num_seqs" not in engine:
        engine["max_num_seqs"] = num_seqs
    options: dict = {"num_cpus": actor_cpus}
    if engine.get("memory_budget") is not None:
        from memlm.config import parse_size
        options["memory"] = parse_size(engine["memory_budget"])
    _start(address, ray)
    import logging

    import ray.data
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
    ds = ds.map_batches(MemlmPredictor, fn_constructor_kwargs={**engine, "chat": chat},
                        concurrency=actors, batch_size=batch_size, batch_format="numpy",
                        **options)
    try:
        results = ds.select_columns(["index", "row"]).take_all()
    except Exception as e:     # a user error in an actor arrives wrapped in Ray's task error
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, MemlmError) or "MemlmError" in str(e):
            last = [ln for ln in str(cause).splitlines() if ln.strip()]
            raise MemlmError(f"a Ray Data actor failed: {last[-1].strip() if last else cause}") from e
        raise
    results.sort(key=lambda r: int(r["index"]))
    return [json.loads(r["row"]) for r in results]
