"""Prometheus metrics of the server (`GET /metrics`), on a registry of its own.

Owns: the metric names (vLLM's, under `memlm:`), the per-request latency histograms and token
counters (`RequestTimer` observes one request), and the gauges read at scrape time from the
engine's metrics (taken between steps by `AsyncLLM.get_metrics`), the memory budget, the
process's RSS and each part of the frozen memory plan.
Does not know: HTTP routes or how requests are served.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from memlm.memory.budget import current_rss

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# The plan's parts, by MemoryPlan attribute.
_PLAN_PARTS = ("baseline", "load_overhead", "weights", "matmul_state", "workspace", "margin", "kv_pool")


class _EngineCollector:
    """Gauges read when Prometheus scrapes: engine state, budget, RSS, the memory plan."""

    def __init__(self, server_metrics: "ServerMetrics"):
        self.server = server_metrics

    def collect(self):
        llm, m = self.server.llm, self.server.engine_metrics
        yield GaugeMetricFamily("memlm:process_rss_bytes", "Resident set size of the server process",
                                value=current_rss())
        if llm is None:
            return
        if m is not None:
            yield GaugeMetricFamily("memlm:num_requests_running", "Requests holding KV blocks",
                                    value=m.num_running)
            yield GaugeMetricFamily("memlm:num_requests_waiting", "Requests queued in the engine",
                                    value=m.num_waiting)
            yield GaugeMetricFamily("memlm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)",
                                    value=m.kv_blocks_used / m.num_kv_blocks if m.num_kv_blocks else 0.0)
            yield GaugeMetricFamily("memlm:kv_cache_used_blocks", "KV blocks in use",
                                    value=m.kv_blocks_used)
            yield GaugeMetricFamily("memlm:kv_cache_total_blocks", "KV blocks in the pool",
                                    value=m.num_kv_blocks)
            yield CounterMetricFamily("memlm:num_preemptions", "Sequences preempted (recomputed later)",
                                      value=m.num_preemptions)
            # vLLM's names: hit rate = hits / queries, both in prompt tokens
            yield CounterMetricFamily("memlm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      value=m.prefix_cache_queries)
            yield CounterMetricFamily("memlm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                      value=m.prefix_cache_hits)
            yield GaugeMetricFamily("memlm:prefix_cache_blocks", "KV blocks findable in the prefix cache",
                                    value=m.prefix_cache_blocks)
            yield CounterMetricFamily("memlm:prefix_cache_evictions", "Cached prefix blocks reclaimed",
                                      value=m.prefix_cache_evictions)
        if llm.budget is not None:
            yield GaugeMetricFamily("memlm:memory_budget_bytes", "The --memory-budget", value=llm.budget.total)
        plan = getattr(llm.engine, "plan", None)
        if plan is not None:
            g = GaugeMetricFamily("memlm:memory_plan_bytes", "Bytes of each part of the memory plan",
                                  labels=["part"])
            for part in _PLAN_PARTS:
                g.add_metric([part], getattr(plan, part))
            yield g


class ServerMetrics:
    """The server's registry; `llm` is set once the model is loaded."""

    def __init__(self):
        self.llm = None
        self.engine_metrics = None      # the snapshot `render` was given
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("memlm:time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("memlm:inter_token_latency_seconds", "Time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("memlm:e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=_LATENCY_BUCKETS[3:], registry=r)
        self.prompt_tokens = Counter("memlm:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("memlm:generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("memlm:request_success", "Requests finished, by finish reason",
                                ["finished_reason"], registry=r)
        self.rejected = Counter("memlm:requests_rejected", "Requests refused before the engine, by reason",
                                ["reason"], registry=r)
        r.register(_EngineCollector(self))

    def attach(self, llm) -> None:
        self.llm = llm

    def render(self, engine_metrics) -> bytes:
        """The exposition text; `engine_metrics` is an `EngineMetrics` read between steps
        (`AsyncLLM.get_metrics`), or None before the model is loaded."""
        self.engine_metrics = engine_metrics
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one engine request: TTFT, inter-token gaps, end-to-end latency, token counts."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.num_prompt_tokens = num_prompt_tokens
        self.num_generated = 0

    def tokens(self, count: int) -> None:
        """`count` new output tokens arrived now (one engine step's worth)."""
        if not count:
            return
        now = time.perf_counter()
        (self.metrics.itl if self.num_generated else self.metrics.ttft).observe(now - self.last)
        self.last = now
        self.num_generated += count

    def finish(self, reasons: list[str | None]) -> None:
        m = self.metrics
        m.e2e.observe(time.perf_counter() - self.start)
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.generation_tokens.inc(self.num_generated)
        for reason in reasons:
            m.finished.labels(reason or "abort").inc()
