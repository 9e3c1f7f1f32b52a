"""Federated distillation on Flower: one tiny simulation (2 clients) serving FedAdam, FedDF and
FedAvg runs end to end, the server optimizers and their checks, the audit of what crosses the
client boundary, and the partition."""
import argparse
import importlib.util
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from memlm.distributed.fed_data import FedConfig, partition  # noqa: E402
from memlm.distributed.fed_train import fedavg  # noqa: E402
from memlm.distributed.fed_server import ServerOptimizer  # noqa: E402
from memlm.distributed.federated import audit_reply, run_federated_series  # noqa: E402
from memlm.entrypoints.cli import federated as cli  # noqa: E402
from memlm.entrypoints.cli import main  # noqa: E402
from memlm.errors import MemlmError  # noqa: E402
from memlm.training import checkpoint  # noqa: E402
from memlm.training.data import Document, load_corpus  # noqa: E402

WORDS = ["crown", "sea", "ship", "king", "queen", "lord", "storm", "night", "sword", "rose", "field", "war"]


def _play(i: int) -> str:
    rng = np.random.default_rng(i)
    lines = [f"ACT {a}. " + " ".join(rng.choice(WORDS, 9)) + "." for a in range(160)]
    return f"The play of house {i}.\n\n" + "\n\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("plays")
    for i in range(6):
        (d / f"play{i}.txt").write_text(_play(i))
    return str(d)


def _cfg(corpus, strategy, tmp=None, **kw):
    base = dict(clients=2, rounds=2, corpus=corpus, strategy=strategy, vocab_size=300, local_steps=4, batch_size=4,
                seq_len=32, server_steps=4, eval_tokens=1024, student="layers=1,hidden=32,heads=2", test_docs=1,
                out=str(tmp) if tmp else None)
    return FedConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """ONE Flower simulation (one Ray start, 2 client processes) serving three runs in turn:
    FedAdam with SGD clients (3 rounds, saving the global student), FedDF, then FedAvg."""
    out = tmp_path_factory.mktemp("fed") / "global"
    cfgs = [_cfg(corpus, "fedadam", out, rounds=3, client_optimizer="sgd", lr=0.5, local_steps=1,
                 server_lr=1e-2, eval_every=2),
            _cfg(corpus, "feddf"), _cfg(corpus, "fedavg")]
    return dict(zip(("fedadam", "feddf", "fedavg"), run_federated_series(cfgs))), cfgs


def _check_audit(result, cfg):
    arrays = [a for a in result.audit if a["record"] == "arrays"]
    metrics = [a for a in result.audit if a["record"] == "metrics"]
    model = checkpoint.load_model_dir(cfg.out) if cfg.out else None
    names = set(model.state_dict()) if model is not None else {a["key"] for a in arrays}
    # every reply: one float array per student parameter, three numbers; nothing else
    assert len(arrays) == cfg.rounds * cfg.clients * len(names)
    assert all(a["dtype"].startswith("float") and a["key"] in names for a in arrays)
    assert sorted({m["key"] for m in metrics}) == ["num-examples", "optimizer-kept", "train-loss"]
    assert len(metrics) == cfg.rounds * cfg.clients * 3
    assert {a["record"] for a in result.audit} == {"arrays", "metrics"}


def test_fedavg_simulation_end_to_end(runs):
    result, cfg = runs[0]["fedavg"], runs[1][2]
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert all(len(r["clients"]) == 2 for r in result.rounds[1:])
    # each client kept its AdamW moments in its own Flower context from round 1 to round 2, and
    # started afresh in this run although the same client processes served two runs before it
    assert [[c["optimizer_kept"] for c in r["clients"]] for r in result.rounds[1:]] == [[False, False], [True, True]]
    assert all(r["step_norm"] == pytest.approx(r["delta_norm"]) for r in result.rounds[1:])   # plain mean
    assert result.final_loss < result.rounds[0]["heldout_loss"]          # the global student learned
    assert math.isfinite(result.final_ppl) and result.simulation_s >= result.wall_s > 0
    # the test document (no party's) is scored once, after the last round
    assert ["test_loss" in r for r in result.rounds] == [False, False, True]
    assert result.test_docs == [d.name for d in partition(load_corpus(cfg.corpus), 2, 1, 1, test_docs=1).test]
    assert math.isfinite(result.test_ppl) and result.test_ppl < math.exp(result.rounds[0]["heldout_loss"])
    _check_audit(result, cfg)


def test_fedadam_keeps_its_server_state_across_rounds(runs):
    result, cfg = runs[0]["fedadam"], runs[1][0]
    rounds = result.rounds[1:]
    assert [r["server_steps"] for r in rounds] == [1, 2, 3]
    assert all(r["momentum_norm"] > 0 and r["second_moment_norm"] > 0 for r in rounds)
    assert len({round(r["momentum_norm"], 9) for r in rounds}) == 3       # the moments move every round
    assert all(r["step_norm"] != pytest.approx(r["delta_norm"], rel=1e-3) for r in rounds)   # not the mean
    assert ["heldout_loss" in r for r in result.rounds] == [True, False, True, True]        # --eval-every 2
    assert result.final_loss < result.rounds[0]["heldout_loss"]
    _check_audit(result, cfg)
    assert checkpoint.load_model_dir(cfg.out).cfg.hidden_size == 32


def test_feddf_simulation_distills_the_ensemble_on_public_text(runs):
    result, cfg = runs[0]["feddf"], runs[1][1]
    for r in result.rounds[1:]:
        assert r["kl"] >= 0 and math.isfinite(r["fedavg_heldout_loss"]) and math.isfinite(r["heldout_loss"])
    assert result.final_loss < result.rounds[0]["heldout_loss"]
    _check_audit(result, cfg)


def test_runs_of_one_simulation_must_share_the_clients_data(corpus):
    with pytest.raises(MemlmError, match="must share clients"):
        run_federated_series([_cfg(corpus, "fedavg"), replace(_cfg(corpus, "fedavg"), clients=3)])


def test_server_optimizers_step_on_the_pseudo_gradient_with_kept_state():
    x, mean = {"w": torch.zeros(3), "n": torch.tensor([2])}, {"w": torch.tensor([1.0, -2.0, 0.0]), "n": torch.tensor([5])}
    plain = ServerOptimizer("fedavg").step(x, mean)
    assert torch.equal(plain["state"]["w"], mean["w"]) and plain["state"]["n"].item() == 5
    m = ServerOptimizer("fedavgm", lr=0.5, beta1=0.9)
    first = m.step(x, mean)["state"]
    again = {"w": first["w"] + mean["w"], "n": mean["n"]}                          # the same delta again
    second = m.step(first, again)["state"]
    assert torch.allclose(first["w"], 0.5 * mean["w"])
    assert torch.allclose(second["w"] - first["w"], 0.5 * 1.9 * mean["w"])          # momentum carried over
    a = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    y = a.step(x, mean)["state"]["w"]
    d = mean["w"].double()
    assert torch.allclose(y.double(), 0.1 * (0.1 * d) / ((0.01 * d * d).sqrt() + 1e-3))
    assert a.state_summary()["server_steps"] == 1 and a.state_summary()["second_moment_norm"] > 0
    with pytest.raises(MemlmError, match="global student's parameters"):
        a.step(x, {"w": mean["w"]})


@pytest.mark.parametrize("kw, message", [
    ({"strategy": "fedadam", "server_lr": 0.0}, "--server-lr must be a positive number, got 0.0"),
    ({"strategy": "fedavgm", "server_lr": -1.0}, "--server-lr must be a positive number"),
    ({"strategy": "fedadam", "server_lr": float("nan")}, "--server-lr must be a positive number"),
    ({"strategy": "fedavgm", "server_momentum": 1.0}, "--server-momentum must be in"),
    ({"strategy": "fedadam", "server_beta2": -0.1}, "--server-beta2 must be in"),
    ({"strategy": "fedadam", "server_tau": 0.0}, "--server-tau must be positive"),
    ({"strategy": "fedavg", "server_lr": 0.5}, "--server-lr does nothing with --strategy fedavg"),
    ({"client_optimizer": "lion"}, "--client-optimizer must be one of adamw, sgd"),
    ({"eval_every": 0}, "--eval-every must be positive"),
    ({"test_docs": -1}, "--test-docs must be 0 or more, got -1"),
    ({"test_tokens": 0}, "--test-tokens must be positive"),
])
def test_bad_server_settings_are_one_line_errors(kw, message):
    with pytest.raises(MemlmError, match=re.escape(message)) as e:
        FedConfig(**kw)
    assert "\n" not in str(e.value)


def test_the_cli_reports_a_bad_server_lr_in_one_line(capsys):
    assert main(["federated", "--strategy", "fedadam", "--server-lr", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --server-lr must be a positive number, got 0.0"


def test_audit_refuses_anything_but_the_students_arrays_and_numbers():
    expected = {"w": (2, 3), "b": (3,)}
    good = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    ok = RecordDict({"arrays": ArrayRecord(torch_state_dict=good), "metrics": MetricRecord({"num-examples": 5})})
    assert [e["key"] for e in audit_reply(ok, expected)] == ["w", "b", "num-examples"]
    tokens = ArrayRecord(array_dict={**{k: Array(v.numpy()) for k, v in good.items()},
                                     "tokens": Array(np.arange(3, dtype=np.int64))})
    with pytest.raises(MemlmError, match="not a parameter"):
        audit_reply(RecordDict({"arrays": tokens, "metrics": MetricRecord({})}), expected)
    as_ints = ArrayRecord(array_dict={"w": Array(np.zeros((2, 3), np.int64)), "b": Array(np.zeros(3, np.float32))})
    with pytest.raises(MemlmError, match="not a parameter"):
        audit_reply(RecordDict({"arrays": as_ints, "metrics": MetricRecord({})}), expected)
    text = RecordDict({"arrays": ArrayRecord(torch_state_dict=good), "metrics": MetricRecord({}),
                       "config": ConfigRecord({"text": "To be, or not to be"})})
    with pytest.raises(MemlmError, match="only the student's arrays"):
        audit_reply(text, expected)
    with pytest.raises(MemlmError, match="expected"):
        audit_reply(RecordDict({"metrics": MetricRecord({})}), expected)


def test_partition_keeps_public_heldout_test_and_clients_apart(corpus):
    docs = load_corpus(corpus)
    part = partition(docs, clients=2, docs_per_client=1, public_docs=1, test_docs=1)
    groups = [part.public, *part.clients, part.heldout, part.test]
    names = [{d.name for d in g} for g in groups]
    assert all(len(g) == 1 for g in groups)
    assert sum(map(len, names)) == len(set().union(*names)) == 5          # disjoint
    assert partition(docs, 2, 1, 1, 1) == part                            # every party derives the same
    assert partition(docs, 2, 1, 1).clients == part.clients and partition(docs, 2, 1, 1).test == []
    assert partition(docs, 1, 1, 1, 1).test == part.test                  # the same test set for any client count
    assert partition(docs, 3, 1, 1, 1).test == part.test
    with pytest.raises(MemlmError, match=re.escape("2 clients x 1 + 1 public + 3 test need 6: use fewer --clients, "
                                                   "--docs-per-client or --test-docs")):
        partition(docs, clients=2, docs_per_client=1, public_docs=1, test_docs=3)
    with pytest.raises(MemlmError, match="use fewer --clients"):
        partition(docs, clients=9, docs_per_client=1, public_docs=1)
    with pytest.raises(MemlmError, match="at least two documents"):
        partition([Document("only", "text")], 1, 1, 1)


def test_fedavg_weights_by_examples_and_flags_build_the_config():
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    assert torch.allclose(fedavg([a, b], [1, 3])["w"], torch.full((2,), 0.75))
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    assert cli.fed_config(parser.parse_args(["federated"])) == FedConfig()
    args = parser.parse_args(["federated", "--clients", "3", "--strategy", "feddf", "--corpus", "bible"])
    assert cli.fed_config(args) == FedConfig(clients=3, strategy="feddf", corpus="bible")
    args = parser.parse_args(["federated", "--strategy", "fedadam", "--server-lr", "0.01", "--client-optimizer", "sgd",
                              "--server-momentum", "0.5", "--eval-every", "3"])
    cfg = cli.fed_config(args)
    assert (cfg.server_learning_rate, cfg.server_optimizer, cfg.client_optimizer) == (0.01, "fedadam", "sgd")
    assert (cfg.server_momentum, cfg.eval_every) == (0.5, 3)
    assert FedConfig(strategy="fedadam").server_learning_rate == 5e-3            # the strategy's default
    assert FedConfig(strategy="feddf").server_learning_rate == 1e-3
    with pytest.raises(MemlmError, match="--strategy must be one of"):
        FedConfig(strategy="fedprox")


def test_the_readme_command_is_the_benchmarks_chosen_setting():
    """`memlm federated --strategy fedadam --client-optimizer sgd --lr 1 --local-steps 1 --rounds 150`
    (README) trains exactly as row 6 of benchmarks/federated.py: the same config up to how often it
    scores, whether a client keeps its (empty: plain SGD has no state) optimizer state, and FedDF's
    server steps (unused by fedadam)."""
    path = Path(__file__).parents[1] / "benchmarks" / "federated.py"
    spec = importlib.util.spec_from_file_location("fed_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    name, row = bench.fed_runs(FedConfig(clients=4, rounds=6, local_steps=25, server_steps=25, test_docs=2))[5]
    assert name == "FedAdam, 1 local SGD step"
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(["federated", "--strategy", "fedadam", "--client-optimizer", "sgd", "--lr", "1",
                              "--local-steps", "1", "--rounds", "150", "--test-docs", "2"])
    cfg = cli.fed_config(args)
    assert cfg.server_lr is None and cfg.server_learning_rate == row.server_learning_rate   # the default: 5e-3
    assert replace(cfg, eval_every=row.eval_every, keep_optimizer=row.keep_optimizer, server_steps=row.server_steps,
                   server_lr=row.server_lr) == row
