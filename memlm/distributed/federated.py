"""Federated distillation on Flower: a ServerApp and a ClientApp run by
`flwr.simulation.run_simulation` (its Ray backend), behind `memlm federated`.

Owns: the messages and their audit, the round loop of the server (send the global student,
receive the clients' students, aggregate by FedAvg or FedDF, score held-out text), the client's
handler (its own shard from its own disk, a local update, the student back), and `run_federated`,
which wires both into one simulation and returns what the server recorded. Does not know: the
learning itself (`fed_train.py`) or who holds which documents (`fed_data.py`).

    server --train: {"arrays": global student, "config": round, model config, tokenizer}--> client k
    client k --reply: {"arrays": its student (float tensors, the global's names and shapes),
                       "metrics": num-examples, train-loss}--> server
    fedavg: global = mean of the students weighted by num-examples
    fedavgm / fedadam: global takes a server-optimizer step on (mean - global), with momentum /
            moments the server keeps across rounds (`fed_server.py`, Reddi et al. 2021)
    feddf:  global = that mean, then distilled on the public shard from the students' averaged
            logits (the server holds the students it received; no client computes anything more)

What crosses from a client is audited on arrival (`audit_reply`): only those two records, only
floating-point arrays named and shaped as the global student's parameters, only numeric
metrics. A reply with anything else (token ids, strings, extra records) stops the run with an
error. The server holds the public shard, the held-out and the test documents, never a client's.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from memlm.distributed.fed_data import FedConfig, Partition, corpus_partition, public_tokenizer, tokenize
from memlm.distributed.fed_server import ServerOptimizer
from memlm.distributed.fed_train import LocalConfig, ensemble_distill, fedavg, heldout_loss, local_update
from memlm.errors import MemlmError

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError:                                        # pragma: no cover - the extra is missing
    ClientApp = ServerApp = None

REPLY_RECORDS = {"arrays": "ArrayRecord", "metrics": "MetricRecord"}
OPTIMIZER_STATE = "memlm.optimizer"   # a client's optimizer state (AdamW moments), in its own Context.state (never sent)
NODE_WAIT_S = 120.0              # how long the server waits for the simulated clients to register


def require_flwr() -> None:
    if ServerApp is None:
        raise MemlmError("federated runs need Flower: pip install 'flwr[simulation]' (or memlm[distributed])")


@dataclass
class FedResult:
    """What the server recorded: held-out loss per round, per-client metrics, the audit log."""
    config: dict
    rounds: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)      # one entry per array/metric a client sent
    wall_s: float = 0.0                                  # this run's rounds (server side)
    simulation_s: float = 0.0                            # the whole simulation: Ray, clients, every run
    test_docs: list[str] = field(default_factory=list)   # names of the test documents (--test-docs)

    @property
    def final_loss(self) -> float:
        return self.rounds[-1].get("heldout_loss", math.nan) if self.rounds else math.nan

    def curve(self) -> list[tuple[int, float]]:
        """(round, held-out loss) for every scored round (round 0 = the initial student)."""
        return [(r["round"], r["heldout_loss"]) for r in self.rounds if "heldout_loss" in r]

    @property
    def final_ppl(self) -> float:
        return math.exp(min(self.final_loss, 50))

    @property
    def test_ppl(self) -> float:
        """The final global student's perplexity on the test documents (nan without --test-docs)."""
        loss = self.rounds[-1].get("test_loss", math.nan) if self.rounds else math.nan
        return math.exp(min(loss, 50))


def audit_reply(content, expected: dict[str, tuple]) -> list[dict]:
    """Check what a client sent; returns one log entry per item.

    Raises:
        MemlmError: a record other than "arrays"/"metrics", an array not named and shaped as a
            parameter of the global student or not floating point, or a non-numeric metric.
    """
    log = []
    for name, record in content.items():
        if REPLY_RECORDS.get(name) != type(record).__name__:
            raise MemlmError(f"a client sent a {type(record).__name__} {name!r}: only the student's arrays and "
                             "numeric metrics may leave a client")
        for key, value in record.items():
            if name == "arrays":
                if key not in expected or tuple(value.shape) != expected[key] or not value.dtype.startswith("float"):
                    raise MemlmError(f"a client sent array {key!r} {value.dtype}{tuple(value.shape)}, which is not a "
                                     "parameter of the global student")
                log.append({"record": name, "key": key, "dtype": value.dtype, "shape": list(value.shape)})
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise MemlmError(f"a client sent metric {key!r} of type {type(value).__name__}: only numbers")
                log.append({"record": name, "key": key, "dtype": type(value).__name__, "shape": []})
    if set(content.keys()) != set(REPLY_RECORDS):
        raise MemlmError(f"a client reply holds {sorted(content.keys())}, expected {sorted(REPLY_RECORDS)}")
    return log


# what a client needs to know about its local update; the server sends it with every round, so
# one simulation can serve several runs (`run_federated_series`) with different client recipes
RECIPE = ("local_steps", "batch_size", "seq_len", "lr", "client_optimizer", "keep_optimizer", "alpha")
# what every run of one simulation must share: who holds which text, and the clients' processes
CLIENT_DATA = ("clients", "corpus", "docs_per_client", "public_docs", "test_docs", "teacher", "seed",
               "threads_per_client")


def _recipe(cfg: FedConfig, run: int) -> str:
    return json.dumps({"run": run, **{k: getattr(cfg, k) for k in RECIPE}})


def _local(recipe: dict, seed: int) -> LocalConfig:
    return LocalConfig(steps=recipe["local_steps"], batch_size=recipe["batch_size"], seq_len=recipe["seq_len"],
                       lr=recipe["lr"], seed=seed)


def initial_student(cfg: FedConfig, tok):
    """The global student before round 1 (seeded: the baselines start from the same weights)."""
    from memlm.models import Transformer
    from memlm.training.students import init_weights, parse_student
    mcfg = parse_student(cfg.student, tok.vocab_size, max_position_embeddings=max(512, cfg.seq_len),
                         eos_token_ids=tuple(getattr(tok, "eos_token_ids", ()) or ()),
                         bos_token_id=getattr(tok, "bos_token_id", None))
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg)
    init_weights(model)
    return model


def _load_teacher(name: str):
    from memlm.loading import load_model
    lm = load_model(name)
    return lm.model.float().eval(), lm.tokenizer


_CLIENT_STATE: dict = {}          # per client process: its tokens (and teacher), built once


def _client_tokens(cfg: FedConfig, pid: int, tokenizer_json: str):
    """Client `pid`'s own tokens, read from its own corpus copy (cached in the client process)."""
    key = (cfg.corpus, cfg.clients, cfg.docs_per_client, cfg.public_docs, cfg.teacher, pid, hash(tokenizer_json))
    if key not in _CLIENT_STATE:
        teacher = None
        if cfg.teacher:
            teacher, tok = _load_teacher(cfg.teacher)
        else:
            from tokenizers import Tokenizer

            from memlm.training.data import TextTokenizer
            tok = TextTokenizer(Tokenizer.from_str(tokenizer_json))
        shard = corpus_partition(cfg).clients[pid]
        _CLIENT_STATE.clear()
        _CLIENT_STATE[key] = (tokenize(shard, tok), teacher)
    return _CLIENT_STATE[key]


def make_client_app(cfg: FedConfig):
    """The ClientApp: on "train", load the global student, update it on this client's shard."""
    require_flwr()
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from memlm.config import ModelConfig
        from memlm.models import Transformer
        torch.set_num_threads(cfg.threads_per_client)
        pid = int(context.node_config["partition-id"])
        conf = msg.content["config"]
        tokens, teacher = _client_tokens(cfg, pid, str(conf["tokenizer"]))
        model = Transformer(ModelConfig.from_dict(json.loads(str(conf["model"]))))
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        r, recipe = int(conf["round"]), json.loads(str(conf["recipe"]))
        key = f"{OPTIMIZER_STATE}.{recipe['run']}"                # this run's state; an earlier run's is dropped
        for stale in [k for k in context.state.keys() if k.startswith(OPTIMIZER_STATE) and k != key]:
            del context.state[stale]
        kept = None
        if recipe["keep_optimizer"] and key in context.state:           # stays in this client's context
            kept = context.state[key].to_torch_state_dict()
        stats = local_update(model, tokens, _local(recipe, cfg.seed), seed=cfg.seed * 1000 + pid,
                             step_offset=r * recipe["local_steps"], teacher=teacher, alpha=recipe["alpha"],
                             optimizer_state=kept, optimizer=recipe["client_optimizer"])
        if recipe["keep_optimizer"]:
            context.state[key] = ArrayRecord(torch_state_dict=stats["optimizer_state"])
        reply = RecordDict({"arrays": ArrayRecord(torch_state_dict=model.state_dict()),
                            "metrics": MetricRecord({"num-examples": int(stats["tokens"]),
                                                     "train-loss": float(stats["loss"]),
                                                     "optimizer-kept": int(kept is not None)})})
        return Message(reply, reply_to=msg)

    return app


def _wait_for_nodes(grid, n: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise MemlmError(f"only {len(nodes)} of {n} Flower clients registered within {NODE_WAIT_S:.0f} s")
        time.sleep(0.2)
    return sorted(nodes)[:n]


class _Server:
    """The server's state across rounds: the global student, its tokenizer, public and held-out tokens."""

    def __init__(self, cfg: FedConfig, part: Partition, result: FedResult, run: int = 0):
        self.cfg, self.result, self.recipe = cfg, result, _recipe(cfg, run)
        if cfg.teacher:
            _, self.tok = _load_teacher(cfg.teacher)
            from memlm.training.checkpoint import _backend
            self.tok_json = _backend(self.tok).to_str()
        else:
            self.tok = public_tokenizer(part.public, cfg.vocab_size)
            self.tok_json = self.tok.tok.to_str()
        self.model = initial_student(cfg, self.tok)
        self.public = tokenize(part.public, self.tok)
        self.heldout = tokenize(part.heldout, self.tok)
        self.test = tokenize(part.test, self.tok) if part.test else None
        self.expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_learning_rate, cfg.server_momentum,
                                         cfg.server_beta2, cfg.server_tau)

    def round(self, grid, nodes: list[int], r: int) -> None:
        from memlm.models import Transformer
        cfg = self.cfg
        config = ConfigRecord({"round": r, "model": json.dumps(self.model.cfg.to_dict()), "tokenizer": self.tok_json,
                               "recipe": self.recipe})
        msgs = [Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=self.model.state_dict()),
                                    "config": config}), dst_node_id=n, message_type="train") for n in nodes]
        replies = list(grid.send_and_receive(msgs))
        states, weights, clients = [], [], []
        for rep in replies:
            if rep.has_error():
                raise MemlmError(f"client {rep.metadata.src_node_id} failed in round {r}: {rep.error.reason}")
            for entry in audit_reply(rep.content, self.expected):
                self.result.audit.append({"round": r, "node": rep.metadata.src_node_id, **entry})
            metrics = rep.content["metrics"]
            states.append(rep.content["arrays"].to_torch_state_dict())
            weights.append(float(metrics["num-examples"]))
            clients.append({"node": rep.metadata.src_node_id, "train_loss": float(metrics["train-loss"]),
                            "optimizer_kept": bool(metrics.get("optimizer-kept", 0))})
        if len(states) != len(nodes):
            raise MemlmError(f"round {r}: {len(states)} of {len(nodes)} clients answered")
        step = self.optimizer.step(self.model.state_dict(), fedavg(states, weights))
        self.model.load_state_dict(step["state"])
        info = {"round": r + 1, "clients": clients, "delta_norm": step["delta_norm"], "step_norm": step["step_norm"],
                **self.optimizer.state_summary()}
        last = r + 1 == cfg.rounds
        if cfg.strategy == "feddf":
            info["fedavg_heldout_loss"] = self._score()
            ensemble = []
            for sd in states:
                m = Transformer(self.model.cfg)
                m.load_state_dict(sd)
                ensemble.append(m.eval())
            server_cfg = LocalConfig(batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.server_learning_rate,
                                     seed=cfg.seed)
            info.update(ensemble_distill(self.model, ensemble, self.public, server_cfg, steps=cfg.server_steps,
                                         seed=cfg.seed + 7, step_offset=r * cfg.server_steps,
                                         temperature=cfg.temperature))
        if last or (r + 1) % cfg.eval_every == 0 or cfg.strategy == "feddf":
            info["heldout_loss"] = self._score()
        if last and self.test is not None:                 # the test documents: scored once, at the end
            info["test_loss"] = heldout_loss(self.model, self.test, cfg.seq_len, cfg.test_tokens)
        self.result.rounds.append(info)

    def _score(self) -> float:
        return heldout_loss(self.model, self.heldout, self.cfg.seq_len, self.cfg.eval_tokens)


def make_server_app(cfgs: list[FedConfig], part: Partition, results: list[FedResult], errors: list):
    """The ServerApp: for each config in turn, R rounds over all K clients; fills `results` (and
    `errors` if it fails)."""
    require_flwr()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            nodes = _wait_for_nodes(grid, cfgs[0].clients)
            for run, (cfg, result) in enumerate(zip(cfgs, results)):
                t0 = time.perf_counter()
                server = _Server(cfg, part, result, run)
                result.test_docs = [d.name for d in part.test]
                result.rounds.append({"round": 0, "heldout_loss": server._score()})
                for r in range(cfg.rounds):
                    server.round(grid, nodes, r)
                if cfg.out:
                    from memlm.training.checkpoint import save_model
                    save_model(server.model, cfg.out, server.tok)
                result.wall_s = time.perf_counter() - t0
        except Exception as e:           # the simulation swallows errors of the server thread: hand it back
            errors.append(e)

    return app


def run_federated(cfg: FedConfig, verbose: bool = False) -> FedResult:
    """Run one Flower simulation of `cfg` (K simulated clients on a local Ray) and return what
    the server recorded.

    Raises:
        MemlmError: Flower missing, a bad partition, a client failure or a reply that fails the audit.
    """
    return run_federated_series([cfg], verbose)[0]


def run_federated_series(cfgs: list[FedConfig], verbose: bool = False) -> list[FedResult]:
    """Run several federated runs one after another in ONE Flower simulation (one Ray start, one
    set of client processes): each run starts from the initial student, with its own strategy and
    client recipe; a client's kept optimizer state never passes from one run to the next.

    Raises:
        MemlmError: the runs differ in who holds which text (`CLIENT_DATA`), or as `run_federated`.
    """
    require_flwr()
    from flwr.simulation import run_simulation
    if not cfgs:
        raise MemlmError("run_federated_series needs at least one config")
    for cfg in cfgs[1:]:
        if diff := [k for k in CLIENT_DATA if getattr(cfg, k) != getattr(cfgs[0], k)]:
            raise MemlmError(f"runs of one federated simulation must share {', '.join(diff)}: start a separate run")
    part = corpus_partition(cfgs[0])                 # checked here, before Ray starts
    results, errors = [FedResult(config=asdict(c)) for c in cfgs], []
    t0 = time.perf_counter()
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(1, min(cfgs[0].clients, _cpus())), "include_dashboard": False,
                             "logging_level": "ERROR" if not verbose else "INFO"}}
    run_simulation(make_server_app(cfgs, part, results, errors), make_client_app(cfgs[0]),
                   num_supernodes=cfgs[0].clients, backend_config=backend, verbose_logging=verbose)
    total = time.perf_counter() - t0
    if errors:
        e = errors[0]
        raise e if isinstance(e, MemlmError) else MemlmError(f"the federated run failed: {e}")
    for cfg, result in zip(cfgs, results):
        if len(result.rounds) != cfg.rounds + 1:
            raise MemlmError(f"the federated run stopped after {len(result.rounds) - 1} of {cfg.rounds} rounds")
        result.simulation_s = total
    return results


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
