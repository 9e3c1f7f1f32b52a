"""`memlm federated`: federated distillation of a student on Flower (a local simulation).

Owns: this command's flags (defaults read from `FedConfig`), turning them into a `FedConfig`,
and printing the rounds. Does not know: Flower or the learning (`memlm.distributed.federated`,
imported only when the command runs, so the core CLI works without the extra).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields

from memlm.distributed.fed_data import CLIENT_OPTIMIZERS, STRATEGIES, FedConfig

_HELP = {
    "clients": "simulated clients; each holds --docs-per-client whole documents of the corpus",
    "rounds": "federated rounds",
    "corpus": "shakespeare (one play per client) | bible (one book per client) | pydocs | a path",
    "strategy": "fedavg: weighted parameter mean; fedavgm / fedadam: a server momentum / Adam step on "
                "(mean - global), state kept across rounds; feddf: the mean, then ensemble distillation on "
                "the public shard",
    "public_docs": "documents in the public shard (no client's; FedDF's transfer set and the BPE's text)",
    "student": "student spec (memlm train --student syntax)",
    "vocab_size": "BPE vocabulary trained on the public shard (ignored with --teacher)",
    "local_steps": "client optimizer steps per round",
    "batch_size": "windows per client step",
    "lr": "client learning rate (adamw: 3e-3; sgd: about 1 with --local-steps 1)",
    "client_optimizer": "adamw, or sgd (with fedadam: the server's Adam does the adapting)",
    "keep_optimizer": "clients keep their AdamW moments across rounds in their own Flower context state",
    "server_steps": "feddf: server distillation steps per round",
    "server_lr": "server learning rate (default by strategy: fedavgm 1.0, fedadam 5e-3, feddf 1e-3 for its "
                 "distillation steps)",
    "server_momentum": "fedavgm: server momentum; fedadam: beta1",
    "server_beta2": "fedadam: decay of the server's second moments",
    "server_tau": "fedadam: adaptivity tau added to the root of the second moments",
    "eval_every": "score the global student every N rounds (and after the last)",
    "teacher": "clients also distill this model on their own text (the student takes its tokenizer)",
    "alpha": "weight of the client-side teacher KL",
    "eval_tokens": "held-out tokens the server scores after each round",
    "test_docs": "training documents no client holds (nor the public shard), scored once after the last round: "
                 "a test set apart from the held-out split that rounds (and any tuning) are scored on",
    "test_tokens": "test tokens scored (from the start of the test documents)",
    "threads_per_client": "torch threads in each simulated client",
    "out": "save the global student here (a model dir `memlm generate --model` reads)",
}


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("federated", help="federated distillation of a student on Flower (local simulation)")
    default = FedConfig()
    for f in fields(FedConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(default, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=_HELP.get(f.name))
            continue
        kind = float if f.name == "server_lr" else type(value) if value is not None else str
        kwargs = {"choices": STRATEGIES} if f.name == "strategy" else {}
        if f.name == "client_optimizer":
            kwargs = {"choices": CLIENT_OPTIMIZERS}
        p.add_argument(flag, type=kind, default=value, help=_HELP.get(f.name), **kwargs)
    p.add_argument("--json", action="store_true", help="print the server's record (rounds, audit summary) as JSON")
    p.add_argument("--verbose", action="store_true", help="Flower's and Ray's logs")
    p.set_defaults(func=cmd_federated)


def fed_config(args) -> FedConfig:
    return FedConfig(**{f.name: getattr(args, f.name) for f in fields(FedConfig)})


def cmd_federated(args) -> int:
    cfg = fed_config(args)
    from memlm.distributed.federated import run_federated
    result = run_federated(cfg, verbose=args.verbose)
    if args.json:
        print(json.dumps({"config": result.config, "rounds": result.rounds, "wall_s": result.wall_s,
                          "heldout_ppl": result.final_ppl,
                          "test_ppl": result.test_ppl if cfg.test_docs else None, "test_docs": result.test_docs,
                          "audit_items": len(result.audit),
                          "audit_records": sorted({a["record"] for a in result.audit})}))
        return 0
    for r in result.rounds:
        if "heldout_loss" not in r:
            continue
        extra = f" (fedavg {math.exp(r['fedavg_heldout_loss']):.2f}, kl {r['kl']:.4f})" if "kl" in r else ""
        print(f"round {r['round']}: held-out perplexity {math.exp(r['heldout_loss']):.2f}{extra}")
    print(f"federated {cfg.strategy}: {cfg.clients} clients x {cfg.rounds} rounds in {result.wall_s:.0f} s; "
          f"global student held-out perplexity {result.final_ppl:.2f}; clients sent only "
          f"{len(result.audit)} parameter arrays / metrics")
    if cfg.test_docs:
        print(f"test perplexity {result.test_ppl:.2f} on {', '.join(result.test_docs)} (no party holds them)")
    if cfg.out:
        print(f"saved {cfg.out} (run it: memlm generate --model {cfg.out})")
    return 0
