"""What every generation endpoint shares: admission, submitting Requests to `AsyncLLM`, merging
their deltas, disconnect handling, and the pieces of a response body.

Owns: the served model's name and context limits (a prompt that cannot fit is a 400 naming the
limit, before it reaches the engine; under a request's `window` / `sinks` KV policy any length
fits, and the policy's sizes are checked up front), back-pressure (requests admitted but not yet producing
tokens count as waiting; past `max_waiting` the answer is 429 with Retry-After), `Submission`
(the tasks that feed one HTTP request's engine requests into one queue and abort them all when
it is closed), `EventStream` (an SSE response that closes its submission the moment the client
goes away), per-request metrics, and token strings for logprobs.
Does not know: endpoint shapes (`completions.py`, `chat.py`) or routes (`app.py`). Prompts and
deltas are `memlm.entrypoints.processing`'s, shared with `LLM` and `AsyncLLM`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from starlette.responses import StreamingResponse

from memlm.engine.request import Request
from memlm.entrypoints.async_llm import AsyncLLM
from memlm.entrypoints.openai.errors import APIError, bad_request, error_body
from memlm.entrypoints.openai.metrics import RequestTimer, ServerMetrics
from memlm.entrypoints.processing import Prompt, RequestDelta
from memlm.errors import RequestError
from memlm.kv.policies import KVPolicySpec
from memlm.sampling import SamplingParams

RETRY_AFTER_S = 1          # what a 429 tells the client to wait
_KV_FIELDS = ("kv_sinks", "kv_window", "kv_budget", "kv_policy")   # the first one named is the param


class OpenAIServing:
    """The engine front shared by the endpoints of one loaded model."""

    def __init__(self, llm, async_llm: AsyncLLM, metrics: ServerMetrics, model_name: str,
                 max_waiting: int | None = None):
        self.llm, self.engine, self.metrics = llm, async_llm, metrics
        self.processor = async_llm.processor
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.max_model_len = llm.max_model_len
        plan = getattr(llm.engine, "plan", None)
        # The scheduler refuses a prompt whose blocks can never fit the pool: say so up front.
        self.kv_tokens = plan.kv_tokens if plan is not None else None
        self.engine_config = getattr(llm.engine, "config", None)   # the --kv-policy defaults
        self.created = int(time.time())
        self.num_waiting = 0       # admitted, no output yet (queued or in prefill)
        self._token_strs: dict[int, str] = {}

    # ---- validation and admission --------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                                f"{self.model_name!r} (see GET /v1/models)", "model", "model_not_found")

    def make_request(self, prompt: Prompt, params: SamplingParams, max_tokens_given: bool,
                     param: str) -> Request:
        """A Request for one validated prompt, or a 400 when it cannot fit the context (under
        `window` / `sinks` the cache stays bounded, so any length fits) or its KV policy
        parameters are inconsistent (naming the field)."""
        spec = self.kv_policy(params)
        P, L = len(prompt.token_ids), self.max_model_len
        if params.truncate_prompt_tokens is not None:      # the engine keeps the last N tokens
            P = min(P, params.truncate_prompt_tokens)
        if spec.past_context:
            if spec.budget and self.kv_tokens is not None and spec.budget >= self.kv_tokens:
                raise bad_request(f"kv_policy={spec.policy} keeps {spec.budget} tokens but the KV "
                                  f"pool holds {self.kv_tokens} under this server's --memory-budget; "
                                  "lower kv_window", "kv_window")
        elif P >= L:
            raise bad_request(f"this model's maximum context length is {L} tokens, but the "
                              f"{param} has {P} tokens; shorten it", param, "context_length_exceeded")
        if (not spec.past_context and max_tokens_given and params.max_tokens is not None
                and P + params.max_tokens > L):
            raise bad_request(f"this model's maximum context length is {L} tokens, but {P} prompt "
                              f"tokens + max_tokens {params.max_tokens} = {P + params.max_tokens}; "
                              "lower max_tokens or shorten the prompt", "max_tokens",
                              "context_length_exceeded")
        if not spec.past_context and self.kv_tokens is not None and P >= self.kv_tokens:
            raise bad_request(f"the {param} has {P} tokens but the KV pool holds {self.kv_tokens} "
                              "tokens under this server's --memory-budget; shorten it", param,
                              "context_length_exceeded")
        try:
            return self.processor.make_request(prompt, params)
        except RequestError as e:     # the structured output's grammar does not compile
            raise bad_request(str(e), "response_format") from None

    def kv_policy(self, params: SamplingParams) -> KVPolicySpec:
        """The request's KV policy with the server's defaults filled in; a 400 naming the field
        when its sizes do not go together (e.g. kv_sinks >= kv_window)."""
        defaults = self.engine_config
        if defaults is None:          # the reference engine refuses evicting policies itself
            return KVPolicySpec()
        try:
            return KVPolicySpec.resolve(params.kv_policy or defaults.kv_policy, params.kv_window,
                                        params.kv_sinks, params.kv_budget, defaults)
        except ValueError as e:
            message = str(e)
            named = sorted((message.index(f), f) for f in _KV_FIELDS if f in message)
            raise bad_request(message, named[0][1] if named else "kv_policy") from None

    def submit(self, requests: list[Request]) -> "Submission":
        """Admit `requests` (429 when the waiting queue is full) and start them."""
        if self.max_waiting is not None and self.num_waiting + len(requests) > self.max_waiting:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server's waiting queue is full ({self.num_waiting} requests "
                                f"waiting, --max-waiting {self.max_waiting}); retry after "
                                f"{RETRY_AFTER_S} s", None, "queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return Submission(self, requests)

    # ---- response pieces -------------------------------------------------------------------
    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    def envelope(self, kind: str, rid: str, **fields) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name,
                **fields}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def sse_error(delta: RequestDelta) -> str:
    """A failed request's error event: 500 when the server is at fault, else 400."""
    status = 500 if delta.internal else 400
    return sse(error_body(status, delta.error, None, "internal_error" if delta.internal else None))


class Submission:
    """The engine requests of one HTTP request, running; `deltas()` merges their progress.

    Each request is pumped by its own task (started at once, so admission counts stay exact
    even if the response never starts); `close()` cancels the tasks, and a cancelled pump
    closes its `AsyncLLM.deltas` generator, which aborts the request and frees its KV blocks.
    """

    def __init__(self, serving: OpenAIServing, requests: list[Request]):
        self.serving = serving
        self.requests = requests
        self._queue: asyncio.Queue = asyncio.Queue()
        self._waiting = set(range(len(requests)))      # no output yet
        self._reasons: list[dict[int, str]] = [{} for _ in requests]
        self._internal = [False] * len(requests)       # failed by the server, not the request
        self._timers = [RequestTimer(serving.metrics, len(r.prompt_token_ids)) for r in requests]
        serving.num_waiting += len(requests)
        self._tasks = []
        for i, r in enumerate(requests):
            task = asyncio.ensure_future(self._pump(i, r))
            # A callback, not a `finally`: a task cancelled before it ever ran skips its body.
            task.add_done_callback(lambda _t, i=i: self._done(i))
            self._tasks.append(task)

    def _started(self, i: int) -> None:
        if i in self._waiting:
            self._waiting.discard(i)
            self.serving.num_waiting -= 1

    async def _pump(self, i: int, req: Request) -> None:
        timer, reasons = self._timers[i], self._reasons[i]
        async for delta in self.serving.engine.deltas(req):
            new_tokens = sum(len(c.token_ids) for c in delta.chunks)
            if new_tokens or delta.finished:
                self._started(i)
            timer.tokens(new_tokens)
            self._internal[i] = self._internal[i] or delta.internal
            for c in delta.chunks:
                if c.finish_reason is not None:
                    reasons[c.index] = c.finish_reason
            self._queue.put_nowait((i, delta))

    def _done(self, i: int) -> None:
        self._started(i)
        n = len(self.requests[i].sequences)
        self._timers[i].finish([self._reasons[i].get(j, "abort") for j in range(n)])
        self._queue.put_nowait((i, None))

    def failure(self, i: int, message: str, param: str) -> APIError:
        """The error answer for request i's failure: 500 when the engine failed (its next
        requests are served as usual), 400 naming `param` when the request itself was at fault."""
        if self._internal[i]:
            return APIError(500, f"internal error: {message}; the server is still up, retry",
                            None, "internal_error")
        return bad_request(message, param)

    async def deltas(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        """(request position, delta) as they come, until every request has finished."""
        open_ = len(self._tasks)
        while open_:
            i, delta = await self._queue.get()
            if delta is None:
                open_ -= 1
            else:
                yield i, delta

    async def close(self) -> None:
        """Abort whatever is still running (no-op once everything finished)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) answer was ready."""


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(raw_request, submission: Submission, work):
    """Await `work` (which reads `submission`); if the client disconnects first, abort the
    submission and raise ClientGone."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(raw_request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
        await submission.close()
    if not task.cancelled() and task.done():
        return task.result()
    raise ClientGone()


class EventStream(StreamingResponse):
    """A server-sent-events response that closes its submission as soon as the client
    disconnects, also while nothing is being sent (a request still queued), not at the next
    write."""

    def __init__(self, body: AsyncIterator[str], submission: Submission):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.submission = submission

    async def __call__(self, scope, receive, send) -> None:
        body = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (body, gone):
                t.cancel()
            await asyncio.gather(body, gone, return_exceptions=True)
            await self.body_iterator.aclose()
            await self.submission.close()
        if body.done() and not body.cancelled() and body.exception() is not None \
                and not isinstance(body.exception(), OSError):
            raise body.exception()
