"""POST /v1/chat/completions: messages through the model's chat template -> assistant replies.

Owns: this endpoint's token limits (`max_completion_tokens`, or the older `max_tokens`; neither
means up to the context's end), `response_format` json_object / json_schema (token masks:
`memlm.structured`), `logprobs` / `top_logprobs` in OpenAI's chat shape, and the
stream's shape (each choice's first chunk carries the role, then content deltas, then a chunk
with the finish reason; usage last when asked for).
Does not know: admission, streaming mechanics or disconnects (`serving.py`).
"""
from __future__ import annotations

import jinja2

from memlm.entrypoints.openai.errors import bad_request
from memlm.entrypoints.openai.protocol import ChatCompletionRequest
from memlm.entrypoints.openai.serving import (EventStream, OpenAIServing, new_id, sse, sse_error,
                                              until_disconnected, usage)
from memlm.entrypoints.processing import OutputAccumulator
from memlm.errors import RequestError


def _token_entry(serving: OpenAIServing, token_id: int, logprob: float) -> dict:
    s = serving.token_str(token_id)
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def _logprobs(serving: OpenAIServing, token_ids, logprobs, top_n: int) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: the top_n best}]} for these tokens."""
    content = []
    for tid, d in zip(token_ids, logprobs):
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({**_token_entry(serving, tid, d[tid]),
                        "top_logprobs": [_token_entry(serving, t, lp) for t, lp in best]})
    return {"content": content}


async def create_chat_completion(serving: OpenAIServing, body: ChatCompletionRequest, raw_request):
    serving.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    try:
        prompt = serving.processor.chat(body.conversation(), 0, body.add_generation_prompt)
    except (RequestError, jinja2.TemplateError) as e:
        raise bad_request(f"messages: {e}", "messages") from None
    limit_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    given = max_tokens is not None
    if not given:       # up to the end of the context
        max_tokens = max(1, serving.max_model_len - len(prompt.token_ids))
    params = body.sampling_params({"logprobs": "top_logprobs", "max_tokens": limit_name},
                                  max_tokens=max_tokens, structured_output=body.structured_output(),
                                  logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    request = serving.make_request(prompt, params, given, "messages")
    if body.session_id is not None:      # kv/sessions.py: the next turn resumes this one's KV
        try:
            request.session_id = serving.llm.check_session_ids(body.session_id, 1)[0]
        except RequestError as e:
            raise bad_request(str(e), "session_id") from None
    submission = serving.submit([request])
    rid = new_id("chatcmpl")
    if body.stream:
        return EventStream(_stream(serving, body, submission, rid), submission)
    return await until_disconnected(raw_request, submission, _whole(serving, body, submission, rid))


def _lp(serving, body, token_ids, logprobs):
    return _logprobs(serving, token_ids, logprobs or [], body.top_logprobs or 0) if body.logprobs else None


async def _whole(serving: OpenAIServing, body: ChatCompletionRequest, submission, rid: str) -> dict:
    request = submission.requests[0]
    acc = OutputAccumulator(request)
    async for _, delta in submission.deltas():
        acc.add(delta)
    out = acc.snapshot()
    if out.error:
        raise submission.failure(0, out.error, "messages")
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _lp(serving, body, c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return serving.envelope("chat.completion", rid, choices=choices,
                            usage=usage(len(request.prompt_token_ids),
                                        sum(len(c.token_ids) for c in out.outputs), out.num_cached_tokens))


async def _stream(serving: OpenAIServing, body: ChatCompletionRequest, submission, rid: str):
    request = submission.requests[0]

    def chunk(choices: list[dict]) -> str:
        return sse(serving.envelope("chat.completion.chunk", rid, choices=choices))

    generated = 0
    try:
        yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for j in range(len(request.sequences))])
        async for _, delta in submission.deltas():
            if delta.error:
                yield sse_error(delta)
                break
            for c in delta.chunks:
                generated += len(c.token_ids)
                if c.text or (c.token_ids and body.logprobs):   # held-back text shows later
                    yield chunk([{"index": c.index, "delta": {"content": c.text},
                                  "logprobs": _lp(serving, body, c.token_ids, c.logprobs),
                                  "finish_reason": None}])
                if c.finish_reason is not None:
                    yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
        else:
            if body.include_usage:
                yield sse(serving.envelope("chat.completion.chunk", rid, choices=[],
                                           usage=usage(len(request.prompt_token_ids), generated,
                                                       request.num_cached_tokens or 0)))
        yield sse("[DONE]")
    finally:
        await submission.close()
