"""`AsyncLLM`: an asyncio front for the engine, for servers with many concurrent requests.

Owns: one background task that steps the engine in a worker thread (the event loop stays
responsive), per-request queues of `RequestOutput` snapshots, and cancellation: a consumer that
stops iterating (or is cancelled) aborts its request, which frees its KV blocks.
Does not know: HTTP, scheduling or tensors. Engine state is only touched between steps, from
the event loop's thread, so no locks are needed.

    llm = LLM(...); engine = AsyncLLM(llm)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=20)):
        print(out.outputs[0].text)
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from memlm.outputs import RequestOutput
from memlm.sampling import SamplingParams


class AsyncLLM:
    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list = []
        self._pending_aborts: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            for req in self._pending_adds:
                self.engine.add_request(req)
            for rid in self._pending_aborts:
                self.engine.abort(rid)
            self._pending_adds, self._pending_aborts = [], []
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            changed = await asyncio.to_thread(self.engine.step)
            for req in changed:
                q = self._queues.get(req.request_id)
                if q is not None:
                    q.put_nowait(req.to_output())

    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       chat: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield snapshots of one request's output as it progresses; the last one is finished.

        Args: prompt as for `LLM.stream` (text, token-id dict, or messages with chat=True).
        """
        if chat or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            item = self.llm._normalize_chat(prompt, 0, True)
        else:
            item = self.llm._normalize(prompt, 0)
        req = self.llm._make_request(item, sampling_params or SamplingParams())
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[req.request_id] = queue
        self._pending_adds.append(req)
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(req.request_id, None)
            if not finished:
                self._pending_aborts.append(req.request_id)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._pending_aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
