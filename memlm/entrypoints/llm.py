"""`LLM`: the offline Python API (vLLM-shaped): generate, chat, stream.

Owns: loading the model under the memory budget (and its weight dtype), choosing the engine by
name (`ENGINES`), driving it until requests finish, progress bars, and returning
`RequestOutput`s in input order.
Does not know: how prompts become Requests or progress becomes deltas (`processing.py`, shared
with `AsyncLLM`), nor how a step is scheduled or computed — that is the engine's job
(`engine/llm_engine.py`, or `engine/reference.py` for the one-at-a-time oracle), behind the
`Engine` protocol (`engine/protocol.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from typing import Iterator

import torch

from memlm import dtypes
from memlm.engine.protocol import Engine
from memlm.entrypoints.processing import Processor, RequestStream
from memlm.errors import RequestError
from memlm.models.registry import DEFAULT_MODEL
from memlm.outputs import RequestOutput, StreamChunk
from memlm.sampling import SamplingParams

WEIGHT_DTYPES = ("fp32", "bf16", "int8", "int4")   # linear methods LLM offers (`memlm.models.linear`)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _paged_engine(model, max_model_len: int, budget, device, verbose: bool, knobs: dict) -> Engine:
    from memlm.engine.config import EngineConfig
    from memlm.engine.llm_engine import LLMEngine
    cfg = EngineConfig(max_model_len=max_model_len, **knobs)
    return LLMEngine(model, cfg, budget, device, verbose=verbose)


def _reference_engine(model, max_model_len: int, budget, device, verbose: bool, knobs: dict) -> Engine:
    from memlm.engine.reference import ReferenceEngine
    return ReferenceEngine(model, max_model_len, device)


@dataclasses.dataclass(frozen=True)
class EngineKind:
    """How `LLM` builds one kind of engine: build(model, max_model_len, budget, device, verbose,
    knobs), and whether it runs inside a memory budget (one that does not refuses a budget)."""

    build: Callable[..., Engine]
    budgeted: bool


ENGINES = {"paged": EngineKind(_paged_engine, budgeted=True),
           "reference": EngineKind(_reference_engine, budgeted=False)}


def resolve_weight_dtype(weight_dtype, alias=None) -> str:
    """Canonical weight dtype of `weight_dtype` or its alias keyword `dtype` ("auto" kept)."""
    name = dtypes.parse(weight_dtype, WEIGHT_DTYPES, "weight_dtype", allow_auto=True)
    if alias is None:
        return name
    alias_name = dtypes.parse(alias, WEIGHT_DTYPES, "dtype", allow_auto=True)
    if name not in (dtypes.AUTO, alias_name):
        raise ValueError(f"weight_dtype={weight_dtype!r} and its alias dtype={alias!r} disagree: "
                         "give one of them")
    return alias_name


class LLM:
    """Load a model once and generate for many prompts inside one memory budget.

    Args:
        model: a model name ("smollm2-135m-instruct"), a .gguf file, an HF directory, or an
            already loaded `memlm.loading.LoadedModel` (tests build tiny ones directly).
        memory_budget: bound on the whole process's peak RSS, e.g. "2GiB" (None: a printed
            fraction of available RAM). Only the paged engine runs inside one.
        device: "cpu" / "cuda" (None: cuda when available).
        engine: a name in `ENGINES`: "paged" (continuous batching, the default) or "reference"
            (one sequence at a time, the test oracle; refuses a memory budget).
        num_threads: CPU threads for torch and the native kernel (None: torch's default).
        weight_dtype: weights and matmuls, "fp32", "bf16" (`models/linear/bf16.py`: bf16
            weights, fp32 residual stream; "float32" / "bfloat16" accepted), "int8" (one scale
            per output row) or "int4" (4-bit groups, see weight_group_size), both quantized
            on load and run with bf16 activations on the CPU (`models/linear/int8.py`,
            `int4.py`). "auto" = bf16 where bf16 matmuls measure 2x faster than fp32 (AMX
            CPUs, GPUs) for the paged engine and a model loaded by name, else fp32. `dtype` is
            an alias keyword.
        weight_group_size: inputs per 4-bit scale for weight_dtype "int4" (32, 64, 128 or
            256; None: 32).
        max_num_seqs, max_num_batched_tokens, block_size, kv_dtype, num_kv_blocks: engine knobs
            (see `memlm.engine.config.EngineConfig`).
        warm_fraction, session_dir, disk_budget: the KV tiers (`EngineConfig`): a share of the
            budget's KV memory for compressed KV in RAM (swapped-out requests, idle sessions),
            and a directory of checksummed KV files under its own disk budget (chat sessions
            that survive restarts; see `chat(session_id=...)`).
    """

    def __init__(self, model=DEFAULT_MODEL, memory_budget: str | int | None = None,
                 device: str | None = None, engine: str = "paged", verbose: bool = True,
                 num_threads: int | None = None, weight_dtype: str = dtypes.AUTO, *,
                 dtype: str | None = None, weight_group_size: int | None = None, **engine_kwargs):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {tuple(ENGINES)}, got {engine!r}")
        kind = ENGINES[engine]
        if memory_budget is not None and not kind.budgeted:
            raise ValueError(f"the {engine} engine does not run inside a memory budget: drop "
                             f"memory_budget={memory_budget!r} or use engine='paged'")
        weight_dtype = resolve_weight_dtype(weight_dtype, dtype)
        from memlm.runtime import configure_process
        configure_process(num_threads)        # process-wide: heap policy, torch threads
        self.device = torch.device(device) if device is not None else default_device()
        self.budget = None
        if kind.budgeted:
            from memlm.memory.budget import MemoryBudget
            self.budget = MemoryBudget.create(memory_budget, verbose=verbose)
        if weight_dtype == dtypes.AUTO:
            from memlm.kernels import bf16_matmul_is_fast
            by_name = isinstance(model, str)
            fast_bf16 = by_name and engine == "paged" and bf16_matmul_is_fast(self.device)
            own = None
            if by_name and engine == "paged" and self.device.type == "cpu":
                from memlm.loading import native_weight_dtype
                own = native_weight_dtype(model)     # a GGUF's own precision: Q4_1 -> int4, ...
            weight_dtype = own if own in ("int4", "int8") or (own == "bf16" and fast_bf16) else \
                "bf16" if fast_bf16 else "fp32"
        self.weight_dtype = weight_dtype
        self.weight_options = {"group_size": weight_group_size} if weight_group_size is not None else {}
        if weight_dtype == "bf16" and engine == "paged" and engine_kwargs.get("max_num_seqs") is not None:
            from memlm.kernels import dense_layer      # decode steps never batch past the native kernels
            self.weight_options["small_batches"] = engine_kwargs["max_num_seqs"] <= dense_layer.MAX_ROWS
        self.loaded = self._load(model)
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model = self.loaded.model
        self.dtype = self.model.linear_method.inner_dtype     # activations inside the blocks
        if next(self.model.parameters()).device != self.device:
            self.model.to(self.device)
        eos = tuple(getattr(self.tokenizer, "eos_token_ids", ()) or self.config.eos_token_ids)
        self.eos_token_ids = eos
        self.max_model_len = self.config.max_position_embeddings
        self.processor = Processor(self.tokenizer, self.config.vocab_size, eos, self.device)
        self.engine: Engine = kind.build(self.model, self.max_model_len, self.budget, self.device,
                                         verbose, engine_kwargs)

    def _load(self, model):
        """Load by name (inside the budget's loading probe) with the linear method of
        `self.weight_dtype`, or convert an already loaded model to it."""
        with self.budget.loading() if self.budget is not None else contextlib.nullcontext():
            if isinstance(model, str):
                from memlm.loading import estimate_load_bytes, load_model
                size = (estimate_load_bytes(model, self.weight_dtype, **self.weight_options)
                        if self.budget is not None else None)
                if size is not None:
                    self.budget.check_load_fits(*size, what=model)
                return load_model(model, weight_dtype=self.weight_dtype, device=self.device,
                                  **self.weight_options)
            if self.weight_dtype != "fp32":
                from memlm.models.linear import set_weight_dtype
                set_weight_dtype(model.model, self.weight_dtype, self.device, **self.weight_options)
                model.weight_bytes = model.model.weight_bytes()    # the caller's LoadedModel too
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
        return self._run_batch([self.processor.prompt(p, i) for i, p in enumerate(prompts)],
                               sampling_params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, session_id=None) -> list[RequestOutput]:
        """Apply the chat template to one conversation (a list of {"role", "content"}) or a list
        of conversations, then generate. Returns one RequestOutput per conversation.

        Args:
            session_id: keep each conversation's KV for its next turn (`kv/sessions.py`): one id
                (one conversation) or one per conversation. A turn whose prompt starts with the
                saved history restores it instead of recomputing it. Needs a tier to keep it in:
                `session_dir=` (disk, survives restarts) and/or `warm_fraction=` (RAM).
        """
        if not messages:
            raise RequestError("chat needs at least one message: [{'role': 'user', 'content': ...}]")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        items = [self.processor.chat(c, i, add_generation_prompt) for i, c in enumerate(conversations)]
        return self._run_batch(items, sampling_params, use_tqdm,
                               self.check_session_ids(session_id, len(conversations)))

    def check_session_ids(self, session_id, n: int) -> list[str] | None:
        """`session_id` (one id, or one per conversation) as a list of `n` validated ids, or None;
        raises RequestError when they are malformed or this engine keeps no sessions."""
        if session_id is None:
            return None
        from memlm.kv.sessions import validate_session_id
        ids = [session_id] if isinstance(session_id, str) else list(session_id)
        if len(ids) != n:
            raise RequestError(f"got {len(ids)} session ids for {n} conversations: give one per conversation")
        offload = getattr(self.engine, "offload", None)
        if offload is None or offload.sessions is None:
            raise RequestError("session_id needs somewhere to keep the KV: pass session_dir=DIR (disk) "
                               "or warm_fraction=0.1 (RAM) to LLM, with the paged engine")
        return [validate_session_id(s) for s in ids]

    def stream(self, prompt, sampling_params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[StreamChunk]:
        """Yield the new text and token ids of one request as they are generated.

        Args:
            prompt: a string, a {"prompt_token_ids": [...]} dict, or (with chat=True or when
                it is a list of messages) a conversation.
        Returns:
            an iterator of StreamChunks (one per completion and step with something new; the
            last chunk of each completion carries its finish_reason).
        """
        req = self.processor.make_request(self.processor.one(prompt, chat), sampling_params)
        self.engine.add_request(req)
        stream = RequestStream(req)
        try:
            while True:
                if not req.finished:
                    self.engine.step()
                delta = stream.take()
                if delta is not None:
                    yield from delta.chunks
                if req.finished:
                    if req.error:
                        raise RequestError(req.error)
                    return
        finally:
            if not req.finished:     # the consumer stopped early: free its memory now
                self.engine.abort(req.request_id)

    # ---- internals -----------------------------------------------------------------------
    def _run_batch(self, items, sampling_params, use_tqdm: bool,
                   session_ids: list[str | None] | None = None) -> list[RequestOutput]:
        requests = self.processor.make_requests(items, sampling_params)
        for r, sid in zip(requests, session_ids or [None] * len(requests)):
            r.session_id = sid
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
        """Engine metrics (KV blocks, fragmentation, preemptions, throughput); None for the
        reference engine."""
        return self.engine.metrics
