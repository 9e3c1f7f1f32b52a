"""`LLM`: the offline Python API (vLLM-shaped): generate, chat, stream.

Owns: loading the model under the memory budget, turning user prompts (text, token-id dicts,
chat messages) into `Request`s, driving an engine until they finish, progress bars, and
assembling `RequestOutput`s in input order.
Does not know: how a step is scheduled or computed — that is the engine's job
(`engine/llm_engine.py`, or `engine/reference.py` for the one-at-a-time oracle).
"""
from __future__ import annotations

import itertools
import sys
from typing import Iterator

import torch

from memlm.engine.request import Request
from memlm.errors import RequestError
from memlm.models.registry import DEFAULT_MODEL
from memlm.outputs import RequestOutput, StreamChunk
from memlm.sampling import SamplingParams

ENGINES = ("paged", "reference")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LLM:
    """Load a model once and generate for many prompts inside one memory budget.

    Args:
        model: a model name ("smollm2-135m-instruct"), a .gguf file, an HF directory, or an
            already loaded `memlm.loading.LoadedModel` (tests build tiny ones directly).
        memory_budget: bound on the whole process's peak RSS, e.g. "2GiB" (None: a printed
            fraction of available RAM).
        device: "cpu" / "cuda" (None: cuda when available).
        engine: "paged" (continuous batching, the default) or "reference" (one sequence at a
            time, the test oracle).
        num_threads: CPU threads for torch and the native kernel (None: torch's default).
        dtype: weights and matmuls, "float32" or "bfloat16" (`memory/weights.py`: bf16 weights,
            fp32 activations); "auto" = bfloat16 where bf16 matmuls measure 2x faster than fp32
            (AMX CPUs, GPUs) for the paged engine and a model loaded by name, else float32.
        max_num_seqs, max_num_batched_tokens, block_size, kv_dtype, num_kv_blocks: engine knobs
            (see `memlm.engine.llm_engine.EngineConfig`).
    """

    def __init__(self, model=DEFAULT_MODEL, memory_budget: str | int | None = None,
                 device: str | None = None, engine: str = "paged", verbose: bool = True,
                 num_threads: int | None = None, dtype: str = "auto", **engine_kwargs):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        self.device = torch.device(device) if device is not None else default_device()
        self.budget = None
        if engine == "paged":
            from memlm.memory.budget import MemoryBudget
            self.budget = MemoryBudget.create(memory_budget, verbose=verbose)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if dtype == "auto":
            from memlm.engine.runner import bf16_matmul_is_fast
            by_name = isinstance(model, str)
            dtype = "bfloat16" if by_name and engine == "paged" and bf16_matmul_is_fast(self.device) \
                else "float32"
        self.dtype = DTYPES[dtype]
        self.loaded = self._load(model)
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model = self.loaded.model
        if self.model.embed.weight.device != self.device:
            self.model.to(self.device)
        eos = tuple(getattr(self.tokenizer, "eos_token_ids", ()) or self.config.eos_token_ids)
        self.eos_token_ids = eos
        self.max_model_len = self.config.max_position_embeddings
        if engine == "reference":
            from memlm.engine.reference import ReferenceEngine
            self.engine = ReferenceEngine(self.model, self.max_model_len, self.device)
        else:
            from memlm.engine.llm_engine import EngineConfig, LLMEngine
            cfg = EngineConfig(max_model_len=self.max_model_len, **engine_kwargs)
            self.engine = LLMEngine(self.model, cfg, self.budget, self.device, verbose=verbose)
        self._ids = itertools.count()

    def _load(self, model):
        """Load by name (inside the budget's loading probe) and apply the weight codec."""
        import contextlib

        from memlm.memory.weights import use_bf16_matmuls, weight_bytes
        with self.budget.loading() if self.budget is not None else contextlib.nullcontext():
            if isinstance(model, str):
                from memlm.loading import estimate_load_bytes, load_model
                size = estimate_load_bytes(model) if self.budget is not None else None
                if size is not None:
                    self.budget.check_load_fits(*size, what=model)
                model = load_model(model)                # fp32: norms and biases stay exact
            if self.dtype == torch.bfloat16:
                use_bf16_matmuls(model.model, pack=self.device.type == "cpu")
                model.weight_bytes = weight_bytes(model.model)
        return model

    # ---- public API ----------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for one or many prompts.

        Args:
            prompts: a string, a list of strings, or {"prompt_token_ids": [...]} dicts.
            sampling_params: one SamplingParams for all, a list (one per prompt) or None.
            use_tqdm: show a progress bar (only when stderr is a terminal).
        Returns:
            one RequestOutput per prompt, in input order.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return self._run_batch([self._normalize(p, i) for i, p in enumerate(prompts)],
                               sampling_params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the chat template to one conversation (a list of {"role", "content"}) or a list
        of conversations, then generate. Returns one RequestOutput per conversation."""
        if not messages:
            raise RequestError("chat needs at least one message: [{'role': 'user', 'content': ...}]")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        items = [self._normalize_chat(c, i, add_generation_prompt) for i, c in enumerate(conversations)]
        return self._run_batch(items, sampling_params, use_tqdm)

    def stream(self, prompt, sampling_params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[StreamChunk]:
        """Yield the new text and token ids of one request as they are generated.

        Args:
            prompt: a string, a {"prompt_token_ids": [...]} dict, or (with chat=True or when
                it is a list of messages) a conversation.
        """
        if chat or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            item = self._normalize_chat(prompt, 0, True)
        else:
            item = self._normalize(prompt, 0)
        req = self._make_request(item, sampling_params or SamplingParams())
        self.engine.add_request(req)
        sent = [0] * len(req.sequences)          # token ids already yielded, per completion
        closed = [False] * len(req.sequences)    # final chunk (with finish_reason) yielded
        try:
            while True:
                if not req.finished:
                    self.engine.step()
                for s in req.sequences:
                    if closed[s.index]:
                        continue
                    text = s.completion.take_new_text()
                    ids = s.completion.token_ids[sent[s.index]:]
                    sent[s.index] += len(ids)
                    closed[s.index] = s.finished
                    if text or ids or s.finished:
                        yield StreamChunk(text, list(ids), s.completion.finish_reason, s.index)
                if req.finished:
                    if req.error:
                        raise RequestError(req.error)
                    return
        finally:
            if not req.finished:     # the consumer stopped early: free its memory now
                self.engine.abort(req.request_id)

    # ---- internals -----------------------------------------------------------------------
    def _normalize(self, prompt, i: int) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = [int(t) for t in prompt["prompt_token_ids"]]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise RequestError(f"prompt {i} is a dict without 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        else:
            raise RequestError(f"prompt {i} must be a string or a dict with 'prompt_token_ids', "
                               f"got {type(prompt).__name__}")
        if ids is None:
            if not text:
                raise RequestError(f"prompt {i} is empty: give at least one character of text")
            ids = self.tokenizer.encode(text, add_special_tokens=True)
        return text, self._check_ids(ids, i)

    def _normalize_chat(self, messages, i: int, add_generation_prompt: bool):
        if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RequestError(f"conversation {i} must be a non-empty list of "
                               "{'role': ..., 'content': ...} messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return text, self._check_ids(self.tokenizer.encode(text, add_special_tokens=False), i)

    def _check_ids(self, ids: list[int], i: int) -> list[int]:
        if not ids:
            raise RequestError(f"prompt {i} is empty: give at least one token")
        V = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise RequestError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {V})")
        return ids

    def _make_request(self, item, params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = item
        return Request(str(next(self._ids)), text, ids, params, self.tokenizer,
                       self.eos_token_ids, device=self.device)

    def _run_batch(self, items, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"got {len(params)} sampling_params for {len(items)} prompts: "
                                 "pass one SamplingParams or one per prompt")
        requests = [self._make_request(it, p) for it, p in zip(items, params)]
        for r in requests:
            self.engine.add_request(r)
        bar = None
        if use_tqdm and len(requests) > 1 and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc="Processed prompts", unit="req", dynamic_ncols=True)
        done = 0
        try:
            while self.engine.has_unfinished():
                self.engine.step()
                if bar is not None:
                    now = sum(r.finished for r in requests)
                    bar.update(now - done)
                    done = now
        except BaseException:
            for r in requests:
                if not r.finished:
                    self.engine.abort(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [r.to_output() for r in requests]

    @property
    def metrics(self):
        """Engine metrics (KV blocks, fragmentation, preemptions, throughput), if paged."""
        return getattr(self.engine, "metrics", None)
