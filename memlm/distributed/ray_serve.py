"""Ray Serve replicas of memlm behind one OpenAI-compatible ingress (`memlm serve --ray`).

Owns: the replica deployment (each replica loads its own `LLM` inside its own memory budget,
then serves memlm's FastAPI app — `build_app` / `ServerState` from `memlm.entrypoints.openai.app`,
reused, not copied — through `@serve.ingress`), the mapping of memlm's queue limits onto Ray
Serve's back-pressure (`--max-num-seqs` -> `max_ongoing_requests` per replica, `--max-waiting`
-> `max_queued_requests` per proxy; Ray's 503 gets a Retry-After through a proxy middleware),
the `/replica` route (this replica's id, pid, RSS, peak RSS and budget, measured inside it), the
`serve run` builder (`app_builder`), and starting or joining a Ray cluster for the CLI.
Does not know: routes or request handling (the OpenAI app), command-line parsing (`cli/serve.py`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import threading

from memlm.errors import MemlmError

APP_NAME = "memlm"
DEPLOYMENT_NAME = "MemlmReplica"
RETRY_AFTER_S = 1                    # what Ray's back-pressure 503 tells the client to wait
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "memlm.distributed.ray_serve.proxy_middlewares"
INSTALL_HINT = "pip install 'memlm[distributed]'"

# The replica of this process (a Ray Serve replica is one actor in its own worker process).
# Set by the replica's constructor, read by the app builder Ray Serve calls right after it.
_REPLICA: dict = {}


def require_ray():
    """(ray, ray.serve), or a one-line MemlmError saying how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise MemlmError(f"--ray needs Ray Serve ({e.name} is not installed): {INSTALL_HINT}") from e
    return ray, serve


@dataclasses.dataclass
class ReplicaSpec:
    """What every replica needs to build its engine and its app (plain data: it is pickled)."""
    llm_kwargs: dict                      # memlm.LLM keywords: model, memory_budget, engine knobs
    model_name: str                       # the name clients send
    api_key: str | None = None
    max_waiting: int | None = None        # memlm's own admission limit inside the replica (429)
    num_threads: int = 1


def replica_actor_name(replica_id: str) -> str:
    """The Ray actor name of a replica (namespace "serve"), from the id `/replica` reports."""
    return f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{replica_id}"


def _register(state, replica_id: str) -> None:
    """Module-level on purpose: the replica class is pickled by value, this module by reference."""
    _REPLICA.update(state=state, replica_id=replica_id)


def _measure(budget) -> dict:
    from memlm.memory.budget import current_rss, peak_rss
    return {"pid": os.getpid(), "rss_bytes": current_rss(), "peak_rss_bytes": peak_rss(),
            "budget_bytes": None if budget is None else budget.total}


def _build_replica_app():
    """Ray Serve's app builder, called in the replica right after its constructor."""
    from memlm.entrypoints.openai.app import build_app
    state, replica_id = _REPLICA["state"], _REPLICA["replica_id"]
    app = build_app(state)

    async def replica():
        """Which replica answered, and its memory, measured in its own process."""
        llm = state.serving.llm if state.serving is not None else None
        return {"replica_id": replica_id, **_measure(llm.budget if llm is not None else None)}
    app.add_api_route("/replica", replica, methods=["GET"])
    return app


def _replica_class():
    _, serve = require_ray()

    @serve.ingress(_build_replica_app)
    class MemlmReplica:
        """One memlm engine: loads the model (in a thread, so the replica's event loop stays
        free) before Ray marks the replica ready, so no request reaches a loading replica."""

        async def __init__(self, spec: ReplicaSpec):
            import torch

            from memlm.entrypoints.llm import LLM
            from memlm.entrypoints.openai.app import ServerState
            torch.set_num_threads(spec.num_threads)
            llm = await asyncio.to_thread(LLM, **spec.llm_kwargs)
            context = serve.get_replica_context()
            self.replica_id = context.replica_id.unique_id
            self.state = ServerState(lambda: llm, spec.model_name, spec.api_key, spec.max_waiting)
            self.llm = llm
            _register(self.state, self.replica_id)

        def check_health(self) -> None:
            """Ray Serve's periodic health check: a replica whose engine failed is restarted."""
            if self.state.load_error is not None:
                raise RuntimeError(self.state.load_error)

        def stats(self) -> dict:
            """The `/replica` figures, for callers holding a deployment handle."""
            return {"replica_id": self.replica_id, **_measure(self.llm.budget)}

    return MemlmReplica


def build_application(spec: ReplicaSpec, replicas: int = 1, num_cpus: float = 1.0,
                      max_ongoing_requests: int | None = None, max_queued_requests: int = -1):
    """The Ray Serve application: `replicas` memlm replicas, each reserving `num_cpus` CPUs
    and (for Ray's scheduler) its memory budget; requests beyond `max_ongoing_requests` per
    replica wait at the proxy, up to `max_queued_requests` (-1: unbounded), then get 503."""
    _, serve = require_ray()
    from memlm.config import parse_size
    from memlm.engine import config as engine_config
    if replicas < 1:
        raise MemlmError(f"--replicas must be >= 1, got {replicas}")
    if num_cpus <= 0:
        raise MemlmError(f"--replica-cpus must be > 0, got {num_cpus}")
    if max_ongoing_requests is None:
        max_ongoing_requests = spec.llm_kwargs.get("max_num_seqs") or engine_config.MAX_NUM_SEQS
    actor_options: dict = {"num_cpus": num_cpus}
    budget = spec.llm_kwargs.get("memory_budget")
    if budget is not None:
        actor_options["memory"] = parse_size(budget)
    deployment = serve.deployment(_replica_class(), name=DEPLOYMENT_NAME, num_replicas=replicas,
                                  ray_actor_options=actor_options,
                                  max_ongoing_requests=max_ongoing_requests,
                                  max_queued_requests=max_queued_requests,
                                  health_check_period_s=5, graceful_shutdown_timeout_s=5)
    return deployment.bind(spec)


def app_builder(args: dict):
    """`serve run memlm.distributed.ray_serve:app_builder model=M memory_budget=1GiB replicas=2`:
    every key=value is a string; model, memory_budget, served_model_name, api_key, replicas,
    replica_cpus, max_num_seqs, max_waiting, threads, weight_dtype, kv_dtype."""
    known = {"model", "memory_budget", "served_model_name", "api_key", "replicas", "replica_cpus",
             "max_num_seqs", "max_waiting", "threads", "weight_dtype", "kv_dtype"}
    unknown = set(args) - known
    if unknown:
        raise MemlmError(f"unknown memlm serve run arguments {sorted(unknown)}; allowed: {sorted(known)}")
    from memlm.models.registry import DEFAULT_MODEL
    model = args.get("model", DEFAULT_MODEL)
    llm_kwargs = {"model": model, "num_threads": int(args.get("threads", 1))}
    for key in ("memory_budget", "weight_dtype", "kv_dtype"):
        if key in args:
            llm_kwargs[key] = args[key]
    if "max_num_seqs" in args:
        llm_kwargs["max_num_seqs"] = int(args["max_num_seqs"])
    waiting = int(args["max_waiting"]) if "max_waiting" in args else -1
    spec = ReplicaSpec(llm_kwargs, args.get("served_model_name", model), args.get("api_key"),
                       None if waiting < 0 else waiting, llm_kwargs["num_threads"])
    return build_application(spec, int(args.get("replicas", 1)), float(args.get("replica_cpus", 1)),
                             max_queued_requests=waiting)


class RetryAfter503:
    """ASGI middleware for Ray Serve's HTTP proxy: a 503 (Ray's back-pressure or no replica
    available) without Retry-After gets `Retry-After: RETRY_AFTER_S`, like memlm's own 429."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_retry_after(message):
            if message["type"] == "http.response.start" and message.get("status") == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
                message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, send_with_retry_after)


def proxy_middlewares() -> list:
    """Ray Serve's proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    from starlette.middleware import Middleware
    return [Middleware(RetryAfter503)]


def start_ray(address: str | None, num_cpus: int | None = None):
    """Join the cluster at `address`, or start a local one (no dashboard) with `num_cpus`
    (default: this machine's). A local cluster's Serve proxy adds Retry-After to its 503s."""
    ray, _ = require_ray()
    if ray.is_initialized():
        return ray
    if address is None:
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError) as e:
            raise MemlmError(f"cannot join the Ray cluster at {address}: {e}; start it with "
                             "`ray start --head` or drop --ray-address to run a local one") from e
    return ray


def deploy(app, host: str, port: int) -> str:
    """Start Serve's HTTP proxy on host:port and run `app` there; returns the base URL once
    every replica has loaded its model (a failed load is one MemlmError line)."""
    _, serve = require_ray()
    import logging
    serve.start(http_options={"host": host, "port": port})
    serve_logger = logging.getLogger("ray.serve")
    level = serve_logger.level
    # serve.run restarts nothing here, but warns that its own (default) HTTP options are ignored
    serve_logger.setLevel(logging.ERROR)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:
        raise MemlmError(f"the Ray Serve replicas failed to start: {_deploy_failure(serve, e)}") from e
    finally:
        serve_logger.setLevel(level)
    return f"http://{host}:{port}"


def _deploy_failure(serve, error: Exception) -> str:
    """The replicas' own error (e.g. memlm's "model file ... does not exist") from Serve's
    status, which keeps the constructor's traceback; Serve's summary when there is none."""
    import re
    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
    except (KeyError, AttributeError):
        message = ""
    errors = re.findall(r"^(?:[\w.]+\.)?(\w*Error): (.+)$", message or "", re.M)
    return errors[-1][1].strip() if errors else str(error).strip()


def serve_forever(args, spec: ReplicaSpec) -> int:
    """`memlm serve --ray`: deploy, print the URL, block until SIGINT / SIGTERM, then tear
    the application down (and the local cluster, when this process started it)."""
    import signal
    ray = start_ray(args.ray_address)
    app = build_application(spec, args.replicas, args.replica_cpus,
                            max_queued_requests=args.max_waiting)
    try:
        url = deploy(app, args.host, args.port)
    except MemlmError:
        if args.ray_address is None:
            ray.shutdown()
        raise
    print(f"memlm: {spec.model_name} on {args.replicas} Ray Serve replicas; serving on {url}/v1",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:      # a second Ctrl-C while tearing down is ignored: the teardown is bounded
        _, serve = require_ray()
        try:
            if args.ray_address is None:
                serve.shutdown()
                ray.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0
