"""What the front ends hand back to users (vLLM-shaped): `LLM.generate` and `AsyncLLM.generate`
give `RequestOutput`s, `LLM.stream` and `AsyncLLM.stream` give `StreamChunk` deltas.

Owns: the plain result dataclasses. Does not know: how they were produced.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated completion of a request (a request with n > 1 has n of these).

    finish_reason: "stop" (EOS, a stop token or a stop string), "length" (max_tokens or the
    model's context), "abort", "error", or None while still running.
    logprobs: per generated token, {token_id: logprob} with the sampled token and the top N.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None   # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result for one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None              # set when this request failed (finish_reason "error")
    num_cached_tokens: int = 0            # prompt tokens served from the prefix cache


@dataclass
class StreamChunk:
    """One increment of a stream: only the text, token ids (and logprobs) new since the last
    chunk of the same completion. The chunks of a completion concatenate to its final output."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    index: int = 0                        # which completion (n > 1 streams interleave)
    logprobs: list[dict[int, float]] | None = None   # per new token, when logprobs were asked for
    stop_reason: str | int | None = None  # set with finish_reason "stop": the string or token id
