"""POST /v1/completions: prompts (text, token ids, or lists of either) -> choices, whole or streamed.

Owns: this endpoint's prompt forms, `echo` (the prompt's text, and with `logprobs` its tokens'
log-probabilities, first token None — how lm-evaluation-harness scores log-likelihoods with
`echo=true, logprobs=1, max_tokens=0` or `1`), `max_tokens=0` (the engine samples one token,
which is dropped), OpenAI's `logprobs` object, choice numbering (prompt i, completion j ->
index i*n + j) and usage. `response_format` is parsed as for chat (`protocol.py`).
Does not know: admission, streaming mechanics or disconnects (`serving.py`).
"""
from __future__ import annotations

from memlm.entrypoints.openai.errors import bad_request
from memlm.entrypoints.openai.protocol import CompletionRequest
from memlm.entrypoints.openai.serving import (EventStream, OpenAIServing, new_id, sse, sse_error,
                                              until_disconnected, usage)
from memlm.entrypoints.processing import OutputAccumulator, Prompt
from memlm.errors import RequestError


def _prompts(serving: OpenAIServing, prompt) -> list[Prompt]:
    """The request's prompts: a string, strings, token ids, or lists of token ids."""
    proc = serving.processor
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise bad_request("prompt is empty: give a string, strings, token ids or lists of them", "prompt")
    elif isinstance(prompt[0], int):
        items = [{"prompt_token_ids": prompt}]
    else:
        items = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]
    try:
        return [proc.prompt(p, i) for i, p in enumerate(items)]
    except RequestError as e:
        raise bad_request(str(e), "prompt") from None


def _logprobs(serving: OpenAIServing, token_ids, logprobs, offset: int = 0) -> dict:
    """OpenAI's completion logprobs: token strings, their logprobs, top alternatives, offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for tid, d in zip(token_ids, logprobs):
        s = serving.token_str(tid)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        token_logprobs.append(None if d is None else d[tid])
        top.append(None if d is None else {serving.token_str(t): lp for t, lp in d.items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


class _Choices:
    """What one completions call returns per choice; shared by the whole and streamed paths."""

    def __init__(self, serving: OpenAIServing, body: CompletionRequest, prompts: list[Prompt]):
        self.serving, self.body, self.prompts = serving, body, prompts
        self.discard = body.max_tokens == 0       # the engine's one token is not the client's

    def echo_text(self, i: int) -> str:
        p = self.prompts[i]
        return p.text if p.text is not None else self.serving.tokenizer.decode(p.token_ids)

    def echo_logprobs(self, i: int, prompt_logprobs) -> dict | None:
        if self.body.logprobs is None or prompt_logprobs is None:
            return None
        return _logprobs(self.serving, self.prompts[i].token_ids, prompt_logprobs)

    def choice(self, i: int, j: int, text: str, token_ids, logprobs, finish_reason, stop_reason,
               prompt_logprobs=None, echo: bool = False) -> dict:
        if self.discard:
            text, token_ids, logprobs = "", [], []
        lp = None
        if self.body.logprobs is not None:
            offset = len(self.echo_text(i)) if echo else 0
            lp = _logprobs(self.serving, token_ids, logprobs or [], offset)
            head = self.echo_logprobs(i, prompt_logprobs) if echo else None
            if head is not None:
                lp = {k: head[k] + lp[k] for k in lp}
        if echo:
            text = self.echo_text(i) + text
        return {"index": i * self.body.n + j, "text": text, "logprobs": lp,
                "finish_reason": finish_reason, "stop_reason": stop_reason}


async def create_completion(serving: OpenAIServing, body: CompletionRequest, raw_request):
    serving.check_model(body.model)
    if body.max_tokens is not None and body.max_tokens < 0:
        raise bad_request(f"max_tokens must be >= 0, got {body.max_tokens}", "max_tokens")
    prompts = _prompts(serving, body.prompt)
    params = body.sampling_params(
        max_tokens=1 if body.max_tokens == 0 else body.max_tokens, logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None, structured_output=body.structured_output())
    requests = [serving.make_request(p, params, body.max_tokens is not None, "prompt") for p in prompts]
    # truncate_prompt_tokens: echo and usage report the prompt the engine runs (its last N tokens)
    prompts = [p if len(r.prompt_token_ids) == len(p.token_ids) else Prompt(None, list(r.prompt_token_ids))
               for p, r in zip(prompts, requests)]
    choices = _Choices(serving, body, prompts)
    submission = serving.submit(requests)
    rid = new_id("cmpl")
    if body.stream:
        return EventStream(_stream(serving, body, choices, submission, rid), submission)
    return await until_disconnected(raw_request, submission, _whole(serving, choices, submission, rid))


async def _whole(serving: OpenAIServing, choices: _Choices, submission, rid: str) -> dict:
    accs = [OutputAccumulator(r) for r in submission.requests]
    async for i, delta in submission.deltas():
        accs[i].add(delta)
    outs = [a.snapshot() for a in accs]
    for i, o in enumerate(outs):
        if o.error:
            raise submission.failure(i, o.error, "prompt")
    data = [choices.choice(i, c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason,
                           o.prompt_logprobs, echo=choices.body.echo)
            for i, o in enumerate(outs) for c in o.outputs]
    generated = 0 if choices.discard else sum(len(c.token_ids) for o in outs for c in o.outputs)
    return serving.envelope("text_completion", rid, choices=sorted(data, key=lambda c: c["index"]),
                            usage=usage(sum(len(p.token_ids) for p in choices.prompts), generated,
                                        sum(o.num_cached_tokens for o in outs)))


async def _stream(serving: OpenAIServing, body: CompletionRequest, choices: _Choices, submission, rid):
    """SSE chunks: with echo, each choice's first chunk carries the prompt (and its logprobs)."""
    echoed = set()
    generated = 0
    try:
        async for i, delta in submission.deltas():
            if delta.error:
                yield sse_error(delta)
                break
            for c in delta.chunks:
                echo = body.echo and (i, c.index) not in echoed
                if echo:
                    echoed.add((i, c.index))
                generated += 0 if choices.discard else len(c.token_ids)
                # Tokens whose text the detokenizer still holds (a split UTF-8 character, a
                # possible stop string) show with a later chunk, unless logprobs list them.
                if not (c.text or c.finish_reason or echo or (c.token_ids and body.logprobs is not None)):
                    continue
                choice = choices.choice(i, c.index, c.text, c.token_ids, c.logprobs, c.finish_reason,
                                        c.stop_reason, delta.prompt_logprobs, echo=echo)
                yield sse(serving.envelope("text_completion", rid, choices=[choice]))
        else:
            if body.include_usage:
                prompt_tokens = sum(len(p.token_ids) for p in choices.prompts)
                yield sse(serving.envelope("text_completion", rid, choices=[],
                                           usage=usage(prompt_tokens, generated, sum(
                                               r.num_cached_tokens or 0 for r in submission.requests))))
        yield sse("[DONE]")
    finally:
        await submission.close()
