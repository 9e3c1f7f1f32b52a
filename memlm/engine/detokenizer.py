"""Per-completion text state: incremental detokenization, stop conditions, streaming hold-back.

Owns: one completion's text and deciding when it must stop (EOS / stop token ids / stop
strings / max_tokens). Multi-byte UTF-8 split across tokens is handled by the tokenizer's
`IncrementalDetokenizer`; stop strings that span tokens are found by searching the text tail,
and text that could still become the start of a stop string is held back from streams.
Does not know: tensors, batching or memory; it sees token ids and a tokenizer's `decode`.
It lives in engine/ because the engine's `Request` finishes sequences with it; the front ends'
output processing (`memlm.entrypoints.processing.RequestStream`) only reads it, so imports
stay one-way (entrypoints -> engine).
"""
from __future__ import annotations

from memlm.loading.tokenizer import IncrementalDetokenizer
from memlm.outputs import CompletionOutput
from memlm.sampling import SamplingParams

class CompletionState:
    """One completion in flight: its tokens, text, logprobs and finish state."""

    def __init__(self, index: int, tokenizer, params: SamplingParams, eos_token_ids,
                 prompt_token_ids: list[int]):
        self.index = index
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._decoder = IncrementalDetokenizer(tokenizer, prompt_token_ids) if tokenizer is not None else None
        self._eos = set() if params.ignore_eos else set(int(t) for t in eos_token_ids)
        self._stop_ids = set(params.stop_token_ids)
        self._max_stop = max((len(s) for s in params.stop), default=0)
        self._streamed = 0   # characters of `text` already handed to a stream

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def add_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> bool:
        """Record one sampled token; returns True when the completion is now finished."""
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if token_id in self._eos or token_id in self._stop_ids:
            self.stop_reason = token_id
            self.finish("stop")
            return True
        if self._decoder is not None:
            before = len(self.text)
            self.text += self._decoder.add(token_id)
            if self._max_stop and len(self.text) > before:
                self._check_stop_strings(max(0, before - self._max_stop + 1))
        if not self.finished and self.params.max_tokens is not None \
                and len(self.token_ids) >= self.params.max_tokens:
            self.finish("length")
        return self.finished

    def _check_stop_strings(self, start: int) -> None:
        best = None
        for s in self.params.stop:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self.text = self.text[:pos + len(s)] if self.params.include_stop_str_in_output else self.text[:pos]
            self.stop_reason = s
            self.finish("stop")

    def _held_back(self) -> int:
        """Characters at the end of `text` that could still grow into a stop string."""
        if self.finished or not self._max_stop:
            return 0
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.params.stop):
                return k
        return 0

    def take_new_text(self) -> str:
        """Text not yet streamed that can no longer be retracted by a stop string."""
        end = len(self.text) - self._held_back()
        if end <= self._streamed:
            return ""
        new, self._streamed = self.text[self._streamed:end], end
        return new

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=self.text, token_ids=list(self.token_ids),
                                finish_reason=self.finish_reason,
                                logprobs=list(self.logprobs) if self.logprobs is not None else None,
                                stop_reason=self.stop_reason)
