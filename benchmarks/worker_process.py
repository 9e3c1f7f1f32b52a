"""Running one benchmark worker in its own process: the result is its last JSON line, and its
peak RSS comes from the kernel (`wait4`'s ru_maxrss), so every engine is measured alone.

Shared by throughput.py, single_stream.py and sessions.py (each script's directory is on
sys.path when it runs as `python benchmarks/X.py`).
"""
from __future__ import annotations

import json
import os
import subprocess


def run_json_worker(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`; its last stdout line starting with "{" as a dict plus `peak_rss` (bytes), or
    {"error": ...} when it failed or printed no result (engines such as vLLM print more after it)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return {"error": f"exit status {status >> 8}"}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": "worker printed no result line"}
    return dict(json.loads(lines[-1]), peak_rss=usage.ru_maxrss * 1024)
