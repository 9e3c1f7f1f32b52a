"""Federated distillation on Flower vs its two baselines, on held-out text.

    python benchmarks/federated.py            # 4 Shakespeare plays as clients, 6 rounds (a few minutes)
    python benchmarks/federated.py --quick    # 2 clients, 2 rounds (a smoke run)

Runs in one invocation, from the same initial student, with the same steps and tokens:
- local-only: each client trains alone on its own play for rounds x local_steps steps (one
  continuous run); reported as the mean of the clients' held-out perplexities;
- centralized: one student on the union of the clients' plays, rounds x local_steps steps of
  clients x batch windows (the same steps and the same tokens as the whole federation);
- six federated runs in one Flower simulation (`run_federated_series`, Ray): FedAvg, FedDF
  (FedAvg, then server distillation of the clients' averaged logits on the public play), FedAvgM
  and FedAdam (a server optimizer on the pseudo-gradient, Reddi et al. 2021) at rounds x local
  steps, then FedAvg and FedAdam talking every step (rounds x local_steps rounds of 1 step; FedAdam
  with plain-SGD clients, so the server's Adam sees the clients' mean gradient).
Held-out = the corpus's validation plays, which no client holds and FedDF never trains on; the
rounds are scored on them, and so was every sweep that picked a setting. Test = `--test-docs`
more plays (default 2: the last two of the partition's order, macbeth and taming_of_the_shrew
for Shakespeare) that no party holds and no sweep scored: the clean check of a chosen setting.
Prints a table with the ratios the acceptance asks for (global < mean local; global within 10%
of centralized), on both.

    python benchmarks/federated.py --only 6   # the chosen setting only (FedAdam, 1 local SGD step)
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import subprocess
import time
from dataclasses import replace

import numpy as np
import torch

from memlm.distributed.fed_data import FedConfig, corpus_partition, public_tokenizer, tokenize
from memlm.distributed.fed_train import LocalConfig, heldout_loss, local_update
from memlm.distributed.federated import initial_student, run_federated_series


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def baselines(cfg: FedConfig) -> dict:
    part = corpus_partition(cfg)
    tok = public_tokenizer(part.public, cfg.vocab_size)
    heldout = tokenize(part.heldout, tok)
    test = tokenize(part.test, tok) if part.test else None
    init = initial_student(cfg, tok)
    steps = cfg.rounds * cfg.local_steps
    local_cfg = LocalConfig(steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, seed=cfg.seed)

    def scores(m) -> dict:
        return {"loss": heldout_loss(m, heldout, cfg.seq_len, cfg.eval_tokens),
                "test_loss": heldout_loss(m, test, cfg.seq_len, cfg.test_tokens) if test is not None else math.nan}

    out = {"init": scores(init), "local": []}
    t0 = time.perf_counter()
    for pid, shard in enumerate(part.clients):
        m = copy.deepcopy(init)
        stats = local_update(m, tokenize(shard, tok), local_cfg, seed=cfg.seed * 1000 + pid)
        out["local"].append({"client": pid, "docs": [d.name for d in shard], "tokens": stats["tokens"], **scores(m)})
    out["local_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    union = np.concatenate([tokenize(s, tok) for s in part.clients])
    m = copy.deepcopy(init)
    stats = local_update(m, union, replace(local_cfg, batch_size=cfg.batch_size * cfg.clients), seed=cfg.seed + 99)
    out["central"] = {"tokens": stats["tokens"], "steps": steps, **scores(m)}
    out["central_s"] = time.perf_counter() - t0
    out["heldout_tokens"] = min(len(heldout) - 1, cfg.eval_tokens // cfg.seq_len * cfg.seq_len)
    out["public"] = [d.name for d in part.public]
    out["heldout_docs"] = [d.name for d in part.heldout]
    out["test_docs"] = [d.name for d in part.test]
    out["test_tokens"] = min(len(test) - 1, cfg.test_tokens // cfg.seq_len * cfg.seq_len) if test is not None else 0
    return out


def fed_runs(cfg: FedConfig) -> list[tuple[str, FedConfig]]:
    """The federated rows: every knob is in its config (and printed). The same clients, tokens and
    initial student as the baselines; rows 1-4 talk every 25 steps, rows 5-6 every step."""
    few, every = dict(rounds=cfg.rounds, local_steps=cfg.local_steps), dict(
        rounds=cfg.rounds * cfg.local_steps, local_steps=1, eval_every=max(1, cfg.rounds * cfg.local_steps // 6))
    return [("FedAvg", replace(cfg, strategy="fedavg", **few)),
            ("FedDF (+ server steps on public text)", replace(cfg, strategy="feddf", server_lr=1e-3, **few)),
            ("FedAvgM", replace(cfg, strategy="fedavgm", server_lr=1.0, server_momentum=0.5, **few)),
            ("FedAdam", replace(cfg, strategy="fedadam", server_lr=3e-2, server_beta2=0.99, server_tau=1e-3, **few)),
            ("FedAvg, 1 local step", replace(cfg, strategy="fedavg", **every)),
            ("FedAdam, 1 local SGD step", replace(cfg, strategy="fedadam", client_optimizer="sgd", lr=1.0,
                                                  keep_optimizer=False, server_lr=5e-3, server_momentum=0.9,
                                                  server_beta2=0.95, server_tau=1e-7, **every))]


def knobs(c: FedConfig) -> tuple[str, str]:
    client = f"{c.client_optimizer} lr {c.lr:g}" + (", kept moments" if c.keep_optimizer and c.client_optimizer == "adamw"
                                                     else "")
    server = {"fedavg": "mean", "feddf": f"mean + {c.server_steps} distill steps lr {c.server_learning_rate:g}",
              "fedavgm": f"momentum {c.server_momentum:g}, lr {c.server_learning_rate:g}",
              "fedadam": f"Adam lr {c.server_learning_rate:g}, b1 {c.server_momentum:g}, b2 {c.server_beta2:g}, "
                         f"tau {c.server_tau:g}"}[c.strategy]
    return client, server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-steps", type=int, default=25)
    ap.add_argument("--server-steps", type=int, default=25)
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--student", default=FedConfig.student)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test-docs", type=int, default=2, help="plays no party holds and no sweep scored (0: none)")
    ap.add_argument("--only", default="", help="comma-separated row numbers (1-6) of the federated runs to do")
    a = ap.parse_args()
    if a.quick:
        a.clients, a.rounds, a.local_steps, a.server_steps = 2, 2, 10, 10
    torch.set_num_threads(a.threads)
    cfg = FedConfig(clients=a.clients, rounds=a.rounds, corpus=a.corpus, local_steps=a.local_steps,
                    server_steps=a.server_steps, student=a.student, threads_per_client=a.threads,
                    test_docs=a.test_docs)
    t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# federated distillation benchmark, {t_start}")
    print(f"CPU: {_cpu()}; load average at start {os.getloadavg()[0]:.2f}; torch threads {a.threads} "
          f"(per client); {cfg.clients} clients, {cfg.rounds * cfg.local_steps} client steps each, "
          f"batch {cfg.batch_size} x {cfg.seq_len} tokens, student {cfg.student}, BPE {cfg.vocab_size} on the public shard")
    base = baselines(cfg)
    rows = fed_runs(cfg)
    if a.only:
        rows = [rows[int(i) - 1] for i in a.only.split(",")]
    results = run_federated_series([c for _, c in rows])          # one Flower simulation for every row
    load_end = os.getloadavg()[0]
    local_ppl = [math.exp(x["loss"]) for x in base["local"]]
    local_test = [math.exp(x["test_loss"]) for x in base["local"]]
    central, central_test = math.exp(base["central"]["loss"]), math.exp(base["central"]["test_loss"])
    client_tokens = sum(x["tokens"] for x in base["local"])
    steps = cfg.rounds * cfg.local_steps
    print(f"public shard: {base['public']}; held-out: {base['heldout_docs']} ({base['heldout_tokens']} tokens scored); "
          f"test: {base['test_docs']} ({base['test_tokens']} tokens scored)")
    print("clients: " + "; ".join(f"{x['client']}: {', '.join(x['docs'])}" for x in base["local"]))
    print()
    print("| model | rounds x local steps | client | server | held-out ppl | vs centralized | test ppl "
          "| vs centralized | client tokens | wall s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")

    def ppls(ppl: float, test: float) -> str:
        return f"{ppl:.2f} | {ppl / central:.3f} | {test:.2f} | {test / central_test:.3f}"

    init = base["init"]
    print(f"| initial student | | | | {ppls(math.exp(init['loss']), math.exp(init['test_loss']))} | 0 | |")
    print(f"| local-only, mean of {cfg.clients} clients | 1 x {steps} | adamw lr {cfg.lr:g} | "
          f"| {ppls(np.mean(local_ppl), np.mean(local_test))} | {client_tokens} | {base['local_s']:.0f} |")
    for x, p, t in zip(base["local"], local_ppl, local_test):
        print(f"| local-only client {x['client']} | | | | {ppls(p, t)} | {x['tokens']} | |")
    print(f"| centralized on the union | 1 x {steps}, batch {cfg.batch_size * cfg.clients} | | adamw lr {cfg.lr:g} "
          f"| {ppls(central, central_test)} | {base['central']['tokens']} | {base['central_s']:.0f} |")
    for (name, c), r in zip(rows, results):
        client, server = knobs(c)
        print(f"| {name} (Flower) | {c.rounds} x {c.local_steps} | {client} | {server} "
              f"| {ppls(r.final_ppl, r.test_ppl)} | {client_tokens} | {r.wall_s:.0f} |")
    print()
    print(f"one Flower simulation served all {len(rows)} runs: {results[0].simulation_s:.0f} s with Ray and client start-up")
    for (name, c), r in zip(rows, results):
        curve = ", ".join(f"{rd}: {math.exp(loss):.1f}" for rd, loss in r.curve())
        print(f"{name} held-out ppl by round: {curve}")
        for split, ppl, local, cen in (("held-out", r.final_ppl, np.mean(local_ppl), central),
                                       ("test", r.test_ppl, np.mean(local_test), central_test)):
            if math.isnan(ppl):
                continue
            print(f"{name}, {split}: better than mean local-only: {ppl < local} ({ppl:.2f} vs {local:.2f}); "
                  f"within 10% of centralized: {ppl <= 1.10 * cen} ({100 * (ppl / cen - 1):+.1f}%)")
        arrays = {a['record'] for a in r.audit}
        print(f"{name}: clients sent {len(r.audit)} items, records {sorted(arrays)} only (audited on arrival)")
    print(f"load average at end {load_end:.2f} (shared machine: timings are under load)")


if __name__ == "__main__":
    main()
