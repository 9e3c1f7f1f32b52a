"""Input and output processing shared by every front end (`LLM`, `AsyncLLM`, the HTTP server).

Owns:
- input: turning what a user passes (a string, a {"prompt_token_ids": [...]} dict, a chat
  conversation) into a `Prompt`, the chat template, validating token ids and SamplingParams,
  and making the engine's `Request` (with a request id unique per processor);
- output: `RequestStream`, which turns a Request's progress into streaming *deltas* (the text
  and token ids new since the last call, per completion), and `OutputAccumulator`, which
  rebuilds cumulative `RequestOutput` snapshots from those deltas.

Does not know: engines, steps or event loops. Incremental detokenization and stop strings stay
in `memlm.engine.detokenizer` (the engine's Request needs them to finish a sequence, and the
engine never imports entrypoints); `RequestStream` only reads what they decided.

    proc = Processor(tokenizer, vocab_size=V, eos_token_ids=(2,))
    req = proc.make_request(proc.prompt("Hello"), SamplingParams(max_tokens=8))
    stream = RequestStream(req)   # after each engine step: stream.take() -> RequestDelta | None
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

from memlm.engine.request import Request
from memlm.errors import RequestError
from memlm.outputs import CompletionOutput, RequestOutput, StreamChunk
from memlm.sampling import SamplingParams


class Prompt(NamedTuple):
    """A validated prompt: its text (None when given as token ids only) and its token ids."""

    text: str | None
    token_ids: list[int]


def is_conversation(prompt) -> bool:
    """A list of {"role": ..., "content": ...} messages (rather than a list of prompts)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


class Processor:
    """Input processing for one model: prompts -> validated token ids -> `Request`s.

    Args:
        tokenizer: has encode(text, add_special_tokens) and apply_chat_template(messages, ...).
        vocab_size: token ids must lie in [0, vocab_size).
        eos_token_ids: ids that end a completion (unless SamplingParams.ignore_eos).
        device: where each request's sampling generators live.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids=(), device="cpu"):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = device
        self._ids = itertools.count()

    # ---- prompts -------------------------------------------------------------------------
    def prompt(self, prompt, i: int = 0) -> Prompt:
        """A string or a {"prompt": ...} / {"prompt_token_ids": [...]} dict; `i` names it in errors."""
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
        return Prompt(text, self.check_ids(ids, i))

    def chat(self, messages, i: int = 0, add_generation_prompt: bool = True) -> Prompt:
        """One conversation through the tokenizer's chat template."""
        if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RequestError(f"conversation {i} must be a non-empty list of "
                               "{'role': ..., 'content': ...} messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return Prompt(text, self.check_ids(self.tokenizer.encode(text, add_special_tokens=False), i))

    def one(self, prompt, chat: bool = False) -> Prompt:
        """One prompt of any form: a conversation when chat=True or when it is a list of messages."""
        if chat or is_conversation(prompt):
            return self.chat(prompt, 0, True)
        return self.prompt(prompt, 0)

    def check_ids(self, ids: list[int], i: int = 0) -> list[int]:
        if not ids:
            raise RequestError(f"prompt {i} is empty: give at least one token")
        V = self.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise RequestError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {V})")
        return ids

    # ---- requests ------------------------------------------------------------------------
    def make_request(self, prompt: Prompt, params: SamplingParams | None = None) -> Request:
        """A new Request (id unique per processor) for one validated prompt."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = prompt
        return Request(str(next(self._ids)), text, ids, params, self.tokenizer,
                       self.eos_token_ids, device=self.device)

    def make_requests(self, prompts: list[Prompt], sampling_params=None) -> list[Request]:
        """One Request per prompt; `sampling_params` is one SamplingParams for all, one per
        prompt, or None (defaults)."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts: "
                                 "pass one SamplingParams or one per prompt")
        return [self.make_request(p, sp) for p, sp in zip(prompts, params)]


# ---- output processing -------------------------------------------------------------------
@dataclass
class RequestDelta:
    """What one request produced since the last delta.

    chunks: one StreamChunk per completion that has new text / tokens or just finished
        (n > 1 completions each get their own, tagged by `index`).
    prompt_logprobs: the prompt's logprobs, in the first delta after they are complete
        (or the last delta, however far they got), else None.
    error: why the request failed, else None; `internal` says the fault is the server's (an
        engine step that raised), not the request's (a prompt that can never fit).
    """

    request_id: str
    chunks: list[StreamChunk] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None
    internal: bool = False
    num_cached_tokens: int = 0        # prompt tokens served from the prefix cache (once admitted)


class RequestStream:
    """Hands out one Request's progress as deltas; call `take()` between engine steps.

    Text that a stop string could still retract is held back by the completion's detokenizer
    (`CompletionState.take_new_text`), so the deltas of a completion concatenate to its final
    text exactly.
    """

    def __init__(self, request: Request):
        self.request = request
        n = len(request.sequences)
        self._sent = [0] * n              # token ids already handed out, per completion
        self._sent_logprobs = [0] * n
        self._closed = [False] * n        # final chunk (with finish_reason) handed out
        self._prompt_logprobs_sent = request.prompt_logprobs is None

    @property
    def done(self) -> bool:
        """Every completion's last chunk has been handed out."""
        return all(self._closed)

    def take(self) -> RequestDelta | None:
        """The delta since the last call, or None when nothing changed."""
        req = self.request
        chunks = []
        for s in req.sequences:
            i = s.index
            if self._closed[i]:
                continue
            c = s.completion
            text = c.take_new_text()
            ids = c.token_ids[self._sent[i]:]
            self._sent[i] += len(ids)
            logprobs = None
            if c.logprobs is not None:
                logprobs = c.logprobs[self._sent_logprobs[i]:]
                self._sent_logprobs[i] += len(logprobs)
            self._closed[i] = s.finished
            if text or ids or s.finished:
                chunks.append(StreamChunk(text, list(ids), c.finish_reason, i, logprobs=logprobs,
                                          stop_reason=c.stop_reason))
        prompt_logprobs = None
        if not self._prompt_logprobs_sent and (not req.needs_prompt_logprobs or req.finished):
            prompt_logprobs, self._prompt_logprobs_sent = list(req.prompt_logprobs), True
        if not chunks and prompt_logprobs is None:
            return None
        return RequestDelta(req.request_id, chunks, self.done, prompt_logprobs, req.error,
                            num_cached_tokens=req.num_cached_tokens or 0)


class OutputAccumulator:
    """Cumulative `RequestOutput` snapshots rebuilt from a request's deltas (what vLLM-style
    `AsyncLLM.generate` consumers expect); the last snapshot equals `Request.to_output()`."""

    def __init__(self, request: Request):
        self._output = RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            outputs=[CompletionOutput(i, "", [], logprobs=[] if request.params.logprobs is not None
                                      else None) for i in range(len(request.sequences))],
            finished=False)

    def add(self, delta: RequestDelta) -> RequestOutput:
        """Fold one delta in; returns a snapshot the caller may keep (later deltas do not change it)."""
        out = self._output
        for chunk in delta.chunks:
            c = out.outputs[chunk.index]
            c.text += chunk.text
            c.token_ids.extend(chunk.token_ids)
            if c.logprobs is not None and chunk.logprobs:
                c.logprobs.extend(chunk.logprobs)
            c.finish_reason, c.stop_reason = chunk.finish_reason, chunk.stop_reason
        if delta.prompt_logprobs is not None:
            out.prompt_logprobs = delta.prompt_logprobs
        out.finished, out.error = delta.finished, delta.error
        out.num_cached_tokens = max(out.num_cached_tokens, delta.num_cached_tokens)
        return self.snapshot()

    def snapshot(self) -> RequestOutput:
        o = self._output
        return RequestOutput(
            o.request_id, o.prompt, list(o.prompt_token_ids),
            [CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                              list(c.logprobs) if c.logprobs is not None else None, c.stop_reason)
             for c in o.outputs],
            o.finished, o.prompt_logprobs, o.error, o.num_cached_tokens)
