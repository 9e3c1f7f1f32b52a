"""`AsyncLLM`: an asyncio front for the engine, for servers with many concurrent requests.

Owns: one background task that steps the engine in a worker thread (the event loop stays
responsive), one queue of `RequestDelta`s per request (what is new since the last step, made by
`processing.RequestStream`), cancellation (a consumer that stops iterating, or is cancelled,
aborts its request, which frees its KV blocks), reading engine state between steps, and
surviving a failed step (its requests end with the error; the loop goes on).
Does not know: HTTP, scheduling or tensors; prompts and deltas are `processing.py`'s, shared
with `LLM`. Engine state is only touched between steps, from the event loop's thread, so no
locks are needed.

    llm = LLM(...); engine = AsyncLLM(llm)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=20)):
        print(out.outputs[0].text)               # cumulative snapshots (vLLM-shaped)
    async for chunk in engine.stream("Hello"):   # or only what is new, like LLM.stream
        print(chunk.text, end="")
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from memlm.entrypoints.processing import OutputAccumulator, RequestDelta, RequestStream
from memlm.errors import RequestError
from memlm.outputs import RequestOutput, StreamChunk
from memlm.sampling import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLM:
    """Serve many concurrent requests from one `LLM`'s engine."""

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.engine
        self.processor = llm.processor
        self._streams: dict[str, tuple[RequestStream, asyncio.Queue]] = {}
        self._live: set[str] = set()            # added and not yet finished or aborted
        self._released: dict[str, asyncio.Event] = {}
        self._pending_adds: list = []
        self._pending_aborts: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stepping = False                  # a step runs in the worker thread right now
        self._readers: list[tuple] = []           # (read, future): inspect() during a step

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _release(self, request_id: str) -> None:
        """The engine no longer holds this request: wake `wait_released` callers."""
        self._live.discard(request_id)
        event = self._released.pop(request_id, None)
        if event is not None:
            event.set()

    async def _run(self) -> None:
        while True:
            adds, aborts = self._pending_adds, self._pending_aborts
            self._pending_adds, self._pending_aborts = [], []
            for req in adds:
                self.engine.add_request(req)
            for rid in aborts:
                self.engine.abort(rid)
                self._release(rid)
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            self._stepping = True
            try:
                changed = await asyncio.to_thread(self.engine.step)
            except Exception as e:     # a bug, not a user error: fail what is in flight, go on
                logger.exception("engine step failed")
                self._fail_live(f"the engine step failed ({type(e).__name__}: {e})")
                continue
            finally:
                self._stepping = False
                self._answer_readers()
            for req in changed:
                entry = self._streams.get(req.request_id)
                if entry is not None:
                    delta = entry[0].take()
                    if delta is not None:
                        entry[1].put_nowait(delta)
                if req.finished:
                    self._release(req.request_id)

    def _fail_live(self, message: str) -> None:
        """End every request in the engine with `message` (their consumers see a final, failed
        delta) and free their blocks, so no consumer waits forever on a loop that failed."""
        for rid in list(self._live):
            self.engine.abort(rid)
            entry = self._streams.get(rid)
            if entry is not None:
                entry[1].put_nowait(RequestDelta(rid, [], finished=True, error=message, internal=True))
            self._release(rid)

    async def get_metrics(self):
        """The engine's metrics, read between steps (None for engines without metrics)."""
        return await self.inspect(lambda engine: engine.metrics)

    async def inspect(self, read):
        """`read(engine)`, run between steps (never while the worker thread mutates the
        engine): at once when no step runs, else as soon as the running one ends, before the
        next one starts."""
        if not self._stepping:
            return read(self.engine)
        waiter = asyncio.get_running_loop().create_future()
        self._readers.append((read, waiter))
        return await waiter

    def _answer_readers(self) -> None:
        readers, self._readers = self._readers, []
        for read, waiter in readers:
            if waiter.done():
                continue
            try:
                waiter.set_result(read(self.engine))
            except Exception as e:     # the reader's bug is its caller's error, not the loop's
                waiter.set_exception(e)

    async def deltas(self, req) -> AsyncIterator[RequestDelta]:
        """Hand a prepared Request (from `self.processor.make_request`) to the engine loop and
        yield its deltas until it finishes; abort it if the consumer goes away first. The HTTP
        server uses this to validate and count prompts itself before submitting them."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = (RequestStream(req), queue)
        self._live.add(req.request_id)
        self._pending_adds.append(req)
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                finished = delta.finished
                yield delta
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self._pending_aborts.append(req.request_id)
                self._wake.set()

    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       chat: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield cumulative snapshots of one request's output as it progresses; the last one is
        finished (and equals what `LLM.generate` returns for it).

        Args: prompt as for `LLM.stream` (text, token-id dict, or messages with chat=True).
        """
        req = self.processor.make_request(self.processor.one(prompt, chat), sampling_params)
        acc = OutputAccumulator(req)
        async for delta in self.deltas(req):
            yield acc.add(delta)

    async def stream(self, prompt, sampling_params: SamplingParams | None = None,
                     chat: bool = False) -> AsyncIterator[StreamChunk]:
        """Yield only what is new (text, token ids, per completion), like `LLM.stream`.

        Raises:
            RequestError: the request failed (e.g. its prompt does not fit the context).
        """
        req = self.processor.make_request(self.processor.one(prompt, chat), sampling_params)
        async for delta in self.deltas(req):
            for chunk in delta.chunks:
                yield chunk
            if delta.finished and delta.error:
                raise RequestError(delta.error)

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns at once (`wait_released` waits for the engine loop)."""
        self._pending_aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    async def wait_released(self, request_id: str, timeout: float | None = None) -> None:
        """Return once the engine loop no longer holds `request_id` (finished, or its abort
        processed, so its KV blocks are free).

        Raises:
            TimeoutError: still held after `timeout` seconds.
        """
        if request_id not in self._live:
            return
        event = self._released.setdefault(request_id, asyncio.Event())
        await asyncio.wait_for(event.wait(), timeout)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._answer_readers()
