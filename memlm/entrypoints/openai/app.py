"""The FastAPI app: routes, the request gate, and the server's lifecycle state.

Owns: `ServerState` (loading -> ready -> draining; the model is loaded by a background thread
started in the lifespan, after which `/health` turns from 503 to 200), `Gate` (an ASGI
middleware run before any route: 503 while draining, 401 for a missing or wrong API key on the
API routes — compared in constant time —, 413 for a body over the limit, 503 while loading),
and the routes, each a thin call into `completions.py`, `chat.py`, `slots.py` or the tokenizer.
Does not know: command-line flags or uvicorn (`memlm.entrypoints.cli.serve`); how responses are
built. Requests never reach the filesystem: prompts are text or token ids, the model is fixed.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from memlm.entrypoints.openai import chat, completions
from memlm.entrypoints.openai.errors import (APIError, api_error_handler, bad_request, error_body,
                                             validation_error_handler)
from memlm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from memlm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                               DetokenizeRequest, TokenizeRequest)
from memlm.entrypoints.openai.serving import ClientGone, OpenAIServing
from memlm.entrypoints.openai.slots import engine_slots
from memlm.errors import MemlmError, RequestError

MAX_BODY_BYTES = 8 * 2**20          # a 100k-token prompt as JSON token ids is ~0.7 MiB
DRAIN_FACTOR = 8                    # an oversized body is read and dropped up to this many limits
_API_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info", "/slots")
logger = logging.getLogger(__name__)


class ServerState:
    """What the routes share. `loader()` builds the `LLM` (in a thread); `on_load_error(msg)` is
    called from that thread when it fails."""

    def __init__(self, loader: Callable, model_name: str, api_key: str | None = None,
                 max_waiting: int | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 on_load_error: Callable[[str], None] | None = None):
        self.loader, self.model_name = loader, model_name
        self.api_key = api_key.encode() if api_key else None
        self.max_waiting, self.max_body_bytes = max_waiting, max_body_bytes
        self.on_load_error = on_load_error
        self.metrics = ServerMetrics()
        self.serving: OpenAIServing | None = None
        self.load_error: str | None = None
        self.draining = False

    def start_loading(self, loop: asyncio.AbstractEventLoop) -> None:
        def load():
            try:
                llm = self.loader()
            except Exception as e:   # a user error (bad model, budget too small) or a bug
                if not isinstance(e, (MemlmError, OSError)):
                    logger.exception("loading the model failed")
                self.load_error = str(e)
                if self.on_load_error is not None:
                    self.on_load_error(self.load_error)
                return
            try:
                loop.call_soon_threadsafe(self._attach, llm)
            except RuntimeError:      # the server shut down while the model was loading
                pass
        threading.Thread(target=load, name="memlm-load", daemon=True).start()

    def _attach(self, llm) -> None:
        from memlm.entrypoints.async_llm import AsyncLLM
        engine = AsyncLLM(llm)
        self.metrics.attach(llm)
        self.serving = OpenAIServing(llm, engine, self.metrics, self.model_name, self.max_waiting)

    async def shutdown(self) -> None:
        if self.serving is not None:
            await self.serving.engine.shutdown()


def _reply(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class Gate:
    """ASGI middleware: draining, API key, body size and loading checks, in that order."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path = self.state, scope["path"]
        api = path.startswith(_API_PREFIXES)
        reply = None
        if state.draining:
            reply = _reply(503, "the server is shutting down; retry on another instance", None,
                           "draining")
        elif api and state.api_key is not None and not self._authorized(scope):
            reply = _reply(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if reply is not None:
            return await reply(scope, receive, send)
        body = await self._read_body(receive)
        if body is None:
            reply = _reply(413, f"request body over {state.max_body_bytes} bytes", None,
                           "body_too_large")
        elif api and state.serving is None:
            reply = _reply(503, state.load_error or "the model is still loading; retry shortly",
                           None, "loading", {"Retry-After": "1"})
        if reply is not None:
            return await reply(scope, receive, send)

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()     # then the client's disconnect, when it comes
        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.state.api_key)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None when it exceeds the limit. An oversized body is still read
        (and dropped), up to DRAIN_FACTOR times the limit, so the client, still sending, gets
        the 413 instead of a reset connection."""
        limit = self.state.max_body_bytes
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                parts.append(chunk)
            elif size > DRAIN_FACTOR * limit:
                break
            if not message.get("more_body", False):
                break
        return b"".join(parts) if size <= limit else None


async def _internal_error(_request, exc: Exception) -> JSONResponse:
    return _reply(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")


async def _client_gone(_request, _exc) -> Response:
    return Response(status_code=499)     # nobody reads it: nginx's "client closed request"


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        state.start_loading(asyncio.get_running_loop())
        yield
        await state.shutdown()

    app = FastAPI(title="memlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, state=state)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _internal_error)

    def serving() -> OpenAIServing:
        if state.serving is None:     # the gate answers this first; kept for direct callers
            raise APIError(503, "the model is still loading; retry shortly", None, "loading")
        return state.serving

    @app.get("/health")
    async def health():
        if state.serving is None:
            return _reply(503, state.load_error or "loading", None, "loading")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        engine_metrics = await state.serving.engine.get_metrics() if state.serving is not None else None
        return Response(state.metrics.render(engine_metrics), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        s = serving()
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                            "owned_by": "memlm", "max_model_len": s.max_model_len}]}

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request):
        return await completions.create_completion(serving(), body, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request):
        return await chat.create_chat_completion(serving(), body, raw)

    @app.get("/slots")
    async def slots():
        """llama-server's /slots: each request the engine holds (`slots.py`), read between steps."""
        return await serving().engine.inspect(engine_slots)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        s = serving()
        s.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        try:
            if body.messages is not None:
                ids = s.processor.chat([m.template_dict() for m in body.messages], 0,
                                       body.add_generation_prompt).token_ids
            else:
                ids = s.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except RequestError as e:
            raise bad_request(str(e), "messages" if body.messages is not None else "prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": s.max_model_len}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's tokenizer facts (lm-evaluation-harness tokenizes through the server with them)."""
        s = serving()
        tk = s.tokenizer
        eos = tk.eos_token_ids[0] if tk.eos_token_ids else None
        eos_text = None if eos is None else s.token_str(eos)
        bos_text = None if tk.bos_token_id is None else s.token_str(tk.bos_token_id)
        return {"tokenizer_class": "memlm", "eos_token": eos_text, "bos_token": bos_text,
                "pad_token": None, "chat_template": tk.chat_template, "model_max_length": s.max_model_len,
                "add_bos_token": tk.add_bos_token}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        s = serving()
        s.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < s.processor.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, "
                              f"{s.processor.vocab_size})", "tokens")
        return {"prompt": s.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app
