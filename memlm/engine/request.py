"""Requests and their sequences: the state the scheduler and engines move around.

Owns: `Request` (one user prompt with its SamplingParams and n completions), `Sequence`
(one completion: the unit the scheduler schedules, with its computed-token count) and
`RequestStatus`. Counts are properties derived from the token lists. Sequence ids come from the
engine that accepts the request (`Request.assign_seq_ids`), so they are unique per engine.
Does not know: tensors, KV blocks (`kv.manager` keeps each sequence's block table), or how
tokens are sampled.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator

from memlm.engine.detokenizer import CompletionState
from memlm.kv.policies import KVPolicyState
from memlm.outputs import RequestOutput
from memlm.sampling import SamplingParams, make_generator
from memlm.structured import GrammarState


class RequestStatus(enum.Enum):
    WAITING = "waiting"          # queued, holds no KV blocks
    RUNNING = "running"          # holds KV blocks, scheduled each step
    PREEMPTED = "preempted"      # blocks taken back; will recompute from its tokens
    FINISHED = "finished"        # done (see the completion's finish_reason)

    @property
    def is_finished(self) -> bool:
        return self is RequestStatus.FINISHED


class Sequence:
    """One completion of a request.

        tokens:   [ prompt ........ | output ..... ]
        computed: [ KV stored ............ | to compute ]   num_computed_tokens
    A sequence needs a forward pass over `all_token_ids[num_computed_tokens:]`; once everything
    is computed, the last position's logits sample the next token.
    """

    def __init__(self, request: "Request", index: int, seed: int | None, device="cpu"):
        self.seq_id: int | None = None          # set by the engine (Request.assign_seq_ids)
        self.request = request
        self.index = index
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.kv_state: KVPolicyState | None = None   # an evicting KV policy's view (the scheduler's)
        self.status = RequestStatus.WAITING
        self.generator = make_generator(None if seed is None else seed + 1_000_003 * index, device)
        self.completion = CompletionState(index, request.tokenizer, request.params,
                                          request.eos_token_ids, request.prompt_token_ids)
        spec = request.params.structured_output
        self.grammar = GrammarState(spec, request.tokenizer) if spec is not None else None

    # --- derived counts ---------------------------------------------------------------
    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status.is_finished

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        P = self.num_prompt_tokens
        if end <= P:
            return self.prompt_token_ids[start:end]
        if start >= P:                        # decode: no copy of the whole history
            return self.output_token_ids[start - P:end - P]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - P]

    def append_token(self, token_id: int, logprobs=None) -> bool:
        """Record a sampled token; returns True if the completion finished (a complete
        structured-output grammar finishes it with "stop"; a token that breaks it, with
        "error" and the request's error set, this completion only)."""
        self.output_token_ids.append(int(token_id))
        done = self.completion.add_token(token_id, logprobs)
        if self.grammar is not None:
            verdict = self.grammar.consume(token_id)
            if verdict is not None and not done:
                if verdict != "stop":
                    self.request.error = verdict
                self.completion.finish("stop" if verdict == "stop" else "error")
                done = True
        return done


class Request:
    """One prompt and its n completions."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer, eos_token_ids=(), arrival: int = 0,
                 device="cpu"):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = [int(t) for t in prompt_token_ids]
        if params.truncate_prompt_tokens is not None:     # vLLM's name: keep the last N tokens
            self.prompt_token_ids = self.prompt_token_ids[-params.truncate_prompt_tokens:]
        self.params = params
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival = arrival
        self.error: str | None = None
        self.num_cached_tokens: int | None = None   # prompt tokens its first admission found cached
        self.session_id: str | None = None     # a validated chat session id (kv/sessions.py)
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.sequences = [Sequence(self, i, params.seed, device) for i in range(params.n)]

    def assign_seq_ids(self, ids: Iterator[int]) -> None:
        """Number the completions from the accepting engine's counter (`next(ids)` each), so ids
        are unique within that engine and never shared between engines in one process."""
        for s in self.sequences:
            s.seq_id = next(ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def fail(self, message: str) -> None:
        """Finish every completion with an error (this request only)."""
        self.error = message
        for s in self.sequences:
            s.completion.finish("error")
            s.status = RequestStatus.FINISHED

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[s.completion.to_output() for s in self.sequences],
            finished=self.finished, prompt_logprobs=self.prompt_logprobs, error=self.error,
            num_cached_tokens=self.num_cached_tokens or 0)
