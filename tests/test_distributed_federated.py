"""Federated distillation on Flower: a tiny simulation (2 clients, 2 rounds) end to end with
FedAvg and with FedDF, the audit of what crosses the client boundary, and the partition."""
import argparse
import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from memlm.distributed.fed_data import FedConfig, partition  # noqa: E402
from memlm.distributed.fed_train import fedavg  # noqa: E402
from memlm.distributed.federated import audit_reply, run_federated  # noqa: E402
from memlm.entrypoints.cli import federated as cli  # noqa: E402
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


def _cfg(corpus, strategy, tmp=None):
    return FedConfig(clients=2, rounds=2, corpus=corpus, strategy=strategy, vocab_size=300, local_steps=4,
                     batch_size=4, seq_len=32, server_steps=4, eval_tokens=1024,
                     student="layers=1,hidden=32,heads=2", out=str(tmp) if tmp else None)


def _check_audit(result, cfg):
    arrays = [a for a in result.audit if a["record"] == "arrays"]
    metrics = [a for a in result.audit if a["record"] == "metrics"]
    model = checkpoint.load_model_dir(cfg.out) if cfg.out else None
    names = set(model.state_dict()) if model is not None else {a["key"] for a in arrays}
    # every reply: one float array per student parameter, two numbers; nothing else
    assert len(arrays) == cfg.rounds * cfg.clients * len(names)
    assert all(a["dtype"].startswith("float") and a["key"] in names for a in arrays)
    assert sorted({m["key"] for m in metrics}) == ["num-examples", "optimizer-kept", "train-loss"]
    assert len(metrics) == cfg.rounds * cfg.clients * 3
    assert {a["record"] for a in result.audit} == {"arrays", "metrics"}


def test_fedavg_simulation_end_to_end(corpus, tmp_path):
    cfg = _cfg(corpus, "fedavg", tmp_path / "global")
    result = run_federated(cfg)
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert all(len(r["clients"]) == 2 for r in result.rounds[1:])
    # each client kept its AdamW moments in its own Flower context from round 1 to round 2
    assert [[c["optimizer_kept"] for c in r["clients"]] for r in result.rounds[1:]] == [[False, False], [True, True]]
    assert result.final_loss < result.rounds[0]["heldout_loss"]          # the global student learned
    assert math.isfinite(result.final_ppl)
    _check_audit(result, cfg)
    assert checkpoint.load_model_dir(tmp_path / "global").cfg.hidden_size == 32


def test_feddf_simulation_distills_the_ensemble_on_public_text(corpus):
    cfg = _cfg(corpus, "feddf")
    result = run_federated(cfg)
    for r in result.rounds[1:]:
        assert r["kl"] >= 0 and math.isfinite(r["fedavg_heldout_loss"]) and math.isfinite(r["heldout_loss"])
    assert result.final_loss < result.rounds[0]["heldout_loss"]
    _check_audit(result, cfg)


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


def test_partition_keeps_public_heldout_and_clients_apart(corpus):
    docs = load_corpus(corpus)
    part = partition(docs, clients=2, docs_per_client=1, public_docs=1)
    groups = [part.public, *part.clients, part.heldout]
    names = [{d.name for d in g} for g in groups]
    assert all(len(g) >= 1 for g in groups)
    assert sum(map(len, names)) == len(set().union(*names))              # disjoint
    assert partition(docs, 2, 1, 1) == part                              # every party derives the same
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
    with pytest.raises(MemlmError, match="--strategy must be one of"):
        FedConfig(strategy="fedprox")
