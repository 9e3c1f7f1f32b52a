"""What `LLM.generate` / `LLM.stream` hand back to users (vLLM-shaped).

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


@dataclass
class StreamChunk:
    """One increment from `LLM.stream`: only the text and token ids new since the last chunk."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    index: int = 0                        # which completion (n > 1 streams interleave)
