"""The reference engine: one sequence at a time over a `ContiguousCache`.

Owns: the simplest obviously-correct generation loop (prefill the whole prompt, then one token
per step), the oracle the paged engine is tested against (`LLM(..., engine="reference")`).
Does not know: paging, budgets or batching. It shares `Request`, the `Sampler` and the
detokenizer with the paged engine, so both produce identical outputs for greedy requests.
Implements the `Engine` protocol (`engine/protocol.py`); it has no memory plan, so `LLM`
refuses a memory budget for it rather than ignore one.
"""
from __future__ import annotations

import itertools
from collections import deque

import torch

from memlm.engine.request import Request, RequestStatus, Sequence
from memlm.models.kv import ContiguousCache
from memlm.sampling import SampleRow, Sampler, top_logprobs


class ReferenceEngine:
    """Generates requests strictly one after another; `step()` advances by one token."""

    def __init__(self, model, max_model_len: int, device: torch.device | str = "cpu"):
        self.model = model
        self.cfg = model.cfg
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        self.sampler = Sampler()
        self.queue: deque[Request] = deque()
        self._cache: ContiguousCache | None = None
        self._seq: Sequence | None = None
        self._seq_ids = itertools.count()      # sequence ids are unique per engine

    def add_request(self, request: Request) -> None:
        request.assign_seq_ids(self._seq_ids)
        if request.params.kv_policy not in (None, "full"):
            request.fail(f"kv_policy={request.params.kv_policy} needs the paged engine; the reference "
                         "engine keeps the full cache")
        elif len(request.prompt_token_ids) >= self.max_model_len:
            request.fail(f"prompt of {len(request.prompt_token_ids)} tokens does not fit the "
                         f"model's {self.max_model_len}-token context; shorten it")
        self.queue.append(request)

    def abort(self, request_id: str) -> None:
        for r in self.queue:
            if r.request_id == request_id:
                for s in r.sequences:
                    s.completion.finish("abort")
                    s.status = RequestStatus.FINISHED
        if self._seq is not None and self._seq.finished:
            self._cache = self._seq = None

    def has_unfinished(self) -> bool:
        return bool(self.queue)

    @property
    def metrics(self) -> None:
        """No KV pool, no batching: nothing to report."""
        return None

    def describe_plan(self) -> str:
        return (f"  reference engine: one sequence at a time in a contiguous cache of up to "
                f"{self.max_model_len} tokens, no memory budget")

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Advance the head request by one token; returns the requests whose state changed."""
        if self.queue and self.queue[0].finished:     # aborted or failed before it ran
            return [self.queue.popleft()]
        if not self.queue:
            return []
        req = self.queue[0]
        seq = next(s for s in req.sequences if not s.finished)
        if self._seq is not seq:
            self._start(seq)
        ids = seq.token_ids_slice(seq.num_computed_tokens, seq.num_tokens)
        self._run(seq, ids)
        if req.finished:
            self.queue.popleft()
        return [req]

    def _start(self, seq: Sequence) -> None:
        max_tokens = seq.request.params.max_tokens or self.max_model_len
        max_len = min(self.max_model_len, seq.num_prompt_tokens + max_tokens)
        self._cache = ContiguousCache(self.cfg.num_kv_heads, self.cfg.head_dim, self.cfg.depth,
                                      max_len, device=self.device)
        self._seq = seq
        seq.status = RequestStatus.RUNNING

    def _run(self, seq: Sequence, ids: list[int]) -> None:
        cache, start = self._cache, seq.num_computed_tokens
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)                 # (T,)
        positions = torch.arange(start, start + len(ids), device=self.device)              # (T,)
        cache.begin_step(len(ids))
        hidden = self.model(input_ids, positions, cache)                                   # (T, H)
        cache.end_step()
        seq.num_computed_tokens += len(ids)
        req = seq.request
        if seq.index == 0 and req.needs_prompt_logprobs:
            for a in range(0, len(ids) - 1, 64):      # 64 rows at a time: (64, V) at most
                rows = hidden[a:min(a + 64, len(ids) - 1)]
                lp = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)  # (r, V)
                for i in range(lp.shape[0]):
                    req.prompt_logprobs.append(top_logprobs(lp[i], ids[a + i + 1], req.params.prompt_logprobs))
        logits = self.model.compute_logits(hidden[-1:])                                    # (1, V)
        row = SampleRow(req.params, seq.generator, req.prompt_token_ids, seq.output_token_ids, seq.grammar)
        out = self.sampler(logits, [row])
        done = seq.append_token(out.token_ids[0], out.logprobs[0])
        if not done and seq.num_tokens >= cache.max_len:
            seq.completion.finish("length")
            done = True
        if done:
            seq.status = RequestStatus.FINISHED
            self._cache = self._seq = None
