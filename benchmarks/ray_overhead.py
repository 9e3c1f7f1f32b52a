"""Ray Serve's cost per request, and one replica's throughput, against `memlm serve` direct.

The same model and flags are served twice in one invocation, both up at once, and measured
interleaved (A B, B A, ...) so both see the same machine load: `memlm serve` (uvicorn, one
process) and `memlm serve --ray --replicas 1` (a local Ray cluster: the Serve HTTP proxy, then
one replica running the same FastAPI app). For each:
- latency of a 1-token completion, sequential (median and p90 of --requests): the difference
  is Ray's per-request overhead (proxy -> router -> replica actor call -> back);
- throughput at --concurrency clients, each --max-tokens tokens (ignore_eos), greedy;
- the serving process's peak RSS (the direct server's VmHWM; the replica's, from /replica).
Prints a table and the ratios. Used for the "scaling on paper" note in BENCHMARKS.md.

    python benchmarks/ray_overhead.py [--model smollm2-135m-instruct] [--requests 30]
        [--rounds 4] [--concurrency 4] [--max-tokens 32] [--memory-budget 1GiB] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx
from serve_load_servers import free_port, wait_healthy


def start(flags: list[str], port: int, log_path: str, env: dict,
          timeout: float = 600.0) -> subprocess.Popen:
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "memlm", "serve", "--port", str(port), *flags],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log_path, timeout)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def peak_rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def completion(client: httpx.Client, url: str, model: str, max_tokens: int) -> int:
    r = client.post(url + "/v1/completions", json={
        "model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True}, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def latency(url: str, model: str) -> float:
    with httpx.Client() as c:
        t = time.perf_counter()
        completion(c, url, model, 1)
        return time.perf_counter() - t


def throughput_round(url: str, model: str, args) -> tuple[int, float]:
    """--concurrency clients, one --max-tokens request each: (tokens, wall seconds)."""
    tokens, lock = [], threading.Lock()

    def client():
        with httpx.Client() as c:
            got = completion(c, url, model, args.max_tokens)
        with lock:
            tokens.append(got)
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(tokens), time.perf_counter() - t


def stream_round(url: str, model: str, args) -> int:
    """--concurrency concurrent streamed completions of --max-tokens; returns the tokens."""
    counts, lock = [], threading.Lock()

    def client():
        n = 0
        with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/completions", json={
                "model": model, "prompt": "Once upon a time", "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                n += line.startswith("data: {")
        with lock:
            counts.append(n)
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts)


def cpu_s(procs) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def ray_processes(pid: int) -> dict:
    """The Serve proxy and replica processes under a `memlm serve --ray` process."""
    import psutil
    found = {"proxy": [], "replica": []}
    for child in psutil.Process(pid).children(recursive=True):
        name = child.name()
        if name.startswith("ray::ProxyActor"):
            found["proxy"].append(child)
        elif name.startswith("ray::ServeRepli"):
            found["replica"].append(child)
    return found


def cpu_profile(url: str, model: str, groups: dict, args) -> dict:
    """CPU seconds each process group spends per 1-token request and per streamed token."""
    before = {k: cpu_s(v) for k, v in groups.items()}
    for _ in range(args.requests):
        latency(url, model)
    mid = {k: cpu_s(v) for k, v in groups.items()}
    tokens = sum(stream_round(url, model, args) for _ in range(args.rounds))
    after = {k: cpu_s(v) for k, v in groups.items()}
    out = {}
    for k in groups:
        out[f"{k}_ms_per_request"] = 1000 * (mid[k] - before[k]) / args.requests
        out[f"{k}_ms_per_token"] = 1000 * (after[k] - mid[k]) / max(1, tokens)
    return out


def measure(urls: dict[str, str], model: str, args) -> dict:
    """Both servers, interleaved (A B, B A, ...) so that both see the same machine load."""
    labels = list(urls)
    for label in labels:                                    # warm up
        for _ in range(3):
            latency(urls[label], model)
        throughput_round(urls[label], model, args)
    lat = {label: [] for label in labels}
    work = {label: [0, 0.0] for label in labels}
    for i in range(args.requests):
        for label in (labels if i % 2 == 0 else labels[::-1]):
            lat[label].append(latency(urls[label], model))
    for i in range(args.rounds):
        for label in (labels if i % 2 == 0 else labels[::-1]):
            tokens, wall = throughput_round(urls[label], model, args)
            work[label][0] += tokens
            work[label][1] += wall
    out = {}
    for label in labels:
        ls = sorted(lat[label])
        out[label] = {"p50_ms": 1000 * statistics.median(ls), "p90_ms": 1000 * ls[int(0.9 * (len(ls) - 1))],
                      "tok_s": work[label][0] / work[label][1],
                      "req_s": args.rounds * args.concurrency / work[label][1]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--memory-budget", default="1GiB")
    p.add_argument("--threads", default="1")
    p.add_argument("--requests", type=int, default=30, help="sequential 1-token requests")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4, help="throughput rounds per server")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--no-omp-env", dest="omp_env", action="store_false",
                   help="do not set OMP_NUM_THREADS=--threads for the servers")
    args = p.parse_args()
    name = "m"
    common = ["--model", args.model, "--served-model-name", name, "--memory-budget", args.memory_budget,
              "--threads", args.threads, "--max-num-seqs", str(max(8, args.concurrency))]
    # Ray starts its workers with OMP_NUM_THREADS = their CPUs; give the direct server the
    # same (OpenMP in memlm's native kernels otherwise takes every core) unless --no-omp-env.
    env = dict(os.environ)
    if args.omp_env:
        env["OMP_NUM_THREADS"] = args.threads
    servers, urls, ready = {}, {}, {}
    try:
        for label, extra in (("memlm serve", []), ("memlm serve --ray (1 replica)",
                                                   ["--ray", "--replicas", "1"])):
            port = free_port()
            log = os.path.join(args.log_dir, f"ray_overhead_{len(servers)}.log")
            t = time.perf_counter()
            servers[label] = start(common + extra, port, log, env)
            ready[label] = time.perf_counter() - t
            urls[label] = f"http://127.0.0.1:{port}"
        rows = measure(urls, name, args)
        import psutil
        ray_label = "memlm serve --ray (1 replica)"
        profile = {"memlm serve": cpu_profile(urls["memlm serve"], name, {
            "server": [psutil.Process(servers["memlm serve"].pid)]}, args)}
        groups = ray_processes(servers[ray_label].pid)
        if not groups["proxy"] or not groups["replica"]:
            raise SystemExit(f"Ray's proxy / replica processes not found: {groups}")
        profile[ray_label] = cpu_profile(urls[ray_label], name, groups, args)
        for label, row in rows.items():
            row["ready_s"] = ready[label]
            row["peak_rss"] = (httpx.get(urls[label] + "/replica", timeout=30).json()["peak_rss_bytes"]
                               if "--ray" in label else peak_rss_of(servers[label].pid))
    finally:
        for proc in servers.values():
            stop(proc)
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if ln.startswith("Model name")), "?")
    omp = f"OMP_NUM_THREADS={args.threads}" if args.omp_env else "OMP_NUM_THREADS unset"
    print(f"\nmodel {args.model}, budget {args.memory_budget}, threads {args.threads} ({omp}); CPU {cpu}; "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"both servers up at once, requests interleaved; latency: {args.requests} sequential "
          f"1-token completions each; throughput: {args.rounds} rounds of {args.concurrency} "
          f"concurrent {args.max_tokens}-token completions each\n")
    print("| server | ready (s) | 1-token p50 (ms) | p90 (ms) | throughput (tok/s) | req/s | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['ready_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['tok_s']:.1f} | "
              f"{r['req_s']:.2f} | {r['peak_rss'] / 2**20:.0f} |")
    d, ray = rows["memlm serve"], rows["memlm serve --ray (1 replica)"]
    pd, pr = profile["memlm serve"], profile["memlm serve --ray (1 replica)"]
    print(f"\nCPU time per request / per streamed token ({args.requests} sequential 1-token requests; "
          f"{args.rounds} rounds of {args.concurrency} concurrent {args.max_tokens}-token streams)\n")
    print("| process | CPU ms per 1-token request | CPU ms per streamed token |")
    print("|---|---:|---:|")
    print(f"| memlm serve (whole process) | {pd['server_ms_per_request']:.2f} | {pd['server_ms_per_token']:.3f} |")
    print(f"| Ray Serve proxy | {pr['proxy_ms_per_request']:.2f} | {pr['proxy_ms_per_token']:.3f} |")
    print(f"| Ray Serve replica | {pr['replica_ms_per_request']:.2f} | {pr['replica_ms_per_token']:.3f} |")
    print(f"\none proxy core saturates at ~{1000 / pr['proxy_ms_per_request']:.0f} short req/s or "
          f"~{1000 / pr['proxy_ms_per_token']:.0f} streamed tok/s; a replica needs "
          f"{pr['replica_ms_per_token']:.3f} CPU ms per streamed token, so one proxy core feeds "
          f"~{pr['replica_ms_per_token'] / pr['proxy_ms_per_token']:.1f} replica cores of streaming")
    print(f"\nRay per-request overhead (p50 difference): {ray['p50_ms'] - d['p50_ms']:.1f} ms; "
          f"throughput ratio ray/direct: {ray['tok_s'] / d['tok_s']:.2f}")


if __name__ == "__main__":
    main()
