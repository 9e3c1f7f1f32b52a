"""The OpenAI-compatible HTTP server behind `memlm serve` (FastAPI).

    protocol.py     request bodies (pydantic) -> SamplingParams
    errors.py       OpenAI-shaped errors; validation errors as 400s naming the field
    serving.py      admission (context limits, 429), submitting to AsyncLLM, SSE, disconnects
    completions.py  POST /v1/completions (echo + prompt logprobs, max_tokens=0)
    chat.py         POST /v1/chat/completions
    metrics.py      GET /metrics (Prometheus)
    slots.py        GET /slots (llama-server's: each request's state, tokens, KV blocks)
    app.py          the app, its gate (draining, API key, body size, loading) and routes

Does not know: command-line flags or uvicorn (`memlm.entrypoints.cli.serve`). Importing this
package needs the `serve` extra (fastapi, uvicorn, prometheus-client).
"""
