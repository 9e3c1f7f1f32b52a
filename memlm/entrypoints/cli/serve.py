"""`memlm serve`: the OpenAI-compatible HTTP server (`memlm.entrypoints.openai`) under uvicorn.

Owns: the serve flags (plus the shared model / engine flags of `args.py`), the API key from
--api-key or MEMLM_API_KEY, binding first and loading the model in the background (so
`/health` answers 503 until it is ready), and shutdown: SIGTERM or Ctrl-C stops accepting,
answers 503 to new requests on open connections, lets in-flight requests finish for up to
--drain-timeout seconds, then exits 0 (a second Ctrl-C forces it). A model that fails to load
ends the server with one `error:` line and exit code 1. `--ray --replicas N` serves the same
app from N Ray Serve replicas instead (`memlm.distributed.ray_serve`), each inside --memory-budget.
Does not know: routes or request handling (`memlm/entrypoints/openai/`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from memlm.entrypoints.cli import args as args_mod
from memlm.errors import MemlmError
from memlm.engine.config import SERVE_MAX_NUM_BATCHED_TOKENS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_WAITING = 512          # requests queued before 429 (Ollama's queue length)
DRAIN_TIMEOUT_S = 30.0
API_KEY_ENV = "MEMLM_API_KEY"


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server with memlm's shutdown: mark the state draining on the first signal,
        and return normally after the drain (uvicorn re-raises the signal once it has shut
        down, which would end the process by that signal instead of exit code 0)."""

        def __init__(self, config, state):
            super().__init__(config)
            self.state = state

        def handle_exit(self, sig, frame) -> None:
            self.state.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return DrainingServer


def _cmd_serve_ray(args, api_key: str | None, name: str) -> int:
    from memlm.distributed import ray_serve
    ray_serve.require_ray()
    llm_kwargs = {"model": args.model, **args_mod.engine_kwargs(args)}
    llm_kwargs.setdefault("num_threads", 1)
    for key in ("memory_budget", "device"):
        if getattr(args, key) is not None:
            llm_kwargs[key] = getattr(args, key)
    spec = ray_serve.ReplicaSpec(llm_kwargs, name, api_key, args.max_waiting, llm_kwargs["num_threads"])
    return ray_serve.serve_forever(args, spec)


def cmd_serve(args) -> int:
    if not args.ray and (args.replicas is not None or args.ray_address is not None):
        raise MemlmError("--replicas and --ray-address need --ray (memlm serve --ray --replicas N)")
    try:
        import uvicorn

        from memlm.entrypoints.openai.app import ServerState, build_app
    except ImportError as e:
        raise MemlmError(f"memlm serve needs {e.name}: pip install 'memlm[serve]'") from e
    if args.max_waiting < 1:
        raise MemlmError(f"--max-waiting must be >= 1 (every request waits a moment), got {args.max_waiting}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or args.model
    if args.ray:
        args.replicas = 1 if args.replicas is None else args.replicas
        return _cmd_serve_ray(args, api_key, name)
    failed: list[str] = []

    def load():
        llm = args_mod.make_llm(args)
        print(f"memlm: {name} loaded; serving on http://{args.host}:{args.port}/v1", file=sys.stderr,
              flush=True)
        return llm

    def on_load_error(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    state = ServerState(load, name, api_key, args.max_waiting, on_load_error=on_load_error)
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=args.drain_timeout,
                            lifespan="on")
    server = _server_class()(config, state)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"memlm: warning: serving on {args.host} without an API key (--api-key or "
              f"{API_KEY_ENV})", file=sys.stderr)
    print(f"memlm: listening on http://{args.host}:{args.port}; loading {args.model} ...",
          file=sys.stderr, flush=True)
    server.run()
    if failed:
        raise MemlmError(failed[0])
    return 0


def add_commands(subparsers) -> None:
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)")
    s.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default %(default)s)")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the API routes (default: ${API_KEY_ENV})")
    s.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: --model)")
    s.add_argument("--max-waiting", type=int, default=MAX_WAITING,
                   help="requests waiting for the engine before new ones get 429 (default %(default)s)")
    s.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S,
                   help="seconds in-flight requests may finish after SIGTERM / Ctrl-C (default %(default)s)")
    s.add_argument("--ray", action="store_true",
                   help="serve from Ray Serve replicas behind one ingress (pip install 'memlm[distributed]')")
    s.add_argument("--replicas", type=int, default=None,
                   help="with --ray: replicas, each with its own --memory-budget (default 1)")
    s.add_argument("--ray-address", default=None,
                   help="with --ray: join this Ray cluster (e.g. 10.0.0.1:6379; default: start a local one)")
    s.add_argument("--replica-cpus", type=float, default=1.0,
                   help="with --ray: CPUs Ray reserves per replica (default %(default)s)")
    args_mod.add_model_args(s, batched_tokens=SERVE_MAX_NUM_BATCHED_TOKENS)
    s.set_defaults(func=cmd_serve)
