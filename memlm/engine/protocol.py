"""The `Engine` protocol: what a front end (`LLM`, `AsyncLLM`, the server) may ask of an engine.

Owns: the contract only. `LLMEngine` (paged, continuous batching) and `ReferenceEngine` (one
sequence at a time, the test oracle) implement it; `memlm.entrypoints.llm.ENGINES` picks one
by name.
Does not know: how either engine schedules or computes.

Contract: the front end makes `Request`s (`memlm.entrypoints.processing`), hands them to
`add_request`, and calls `step()` while `has_unfinished()`; each step returns the requests
whose state changed (finished ones included, once). Requests are only read between steps.
`abort` finishes a request's unfinished completions as "abort" and frees what they hold.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from memlm.engine.llm_engine import EngineMetrics
    from memlm.engine.request import Request


@runtime_checkable
class Engine(Protocol):
    def add_request(self, request: Request) -> None:
        """Accept a request (assigning its sequence ids); one it cannot run is failed, not raised."""

    def abort(self, request_id: str) -> None:
        """Finish a request's unfinished completions as "abort" and free its memory."""

    def step(self) -> list[Request]:
        """Advance the work by one step; returns the requests whose state changed."""

    def has_unfinished(self) -> bool:
        """True while a request added to this engine is still held by it."""

    @property
    def metrics(self) -> EngineMetrics | None:
        """KV usage, preemptions and throughput (None for an engine without them)."""

    def describe_plan(self) -> str:
        """How the engine sized itself (memory plan, KV pool), a few printable lines."""
