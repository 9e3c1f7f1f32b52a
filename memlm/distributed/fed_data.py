"""Who holds which text in a federated run, and the run's settings.

Owns: `FedConfig` (every setting of `memlm federated`, validated), the deterministic partition
of a corpus into held-out documents (the corpus's own validation split), one public shard (text
no client holds: the server's FedDF transfer set and the source of the shared BPE tokenizer),
K private client shards (whole documents: one Shakespeare play or one KJV book each by
default) and, with `test_docs`, a test set (training documents nobody holds and that no tuning
scored: the held-out split is what rounds are scored on, so settings get picked on it), and
tokenizing documents in memory. Does not know: Flower (`federated.py`) or
training (`fed_train.py`).

    corpus --split_documents--> train docs | held-out docs (val split: scored, held by nobody)
    train docs, by sha1(name): [public x P][client 0 x D] ... [client K-1 x D][unused][test x T]

The test documents are the last T of that order, so they stay the same for any K that fits.

Every party computes the same partition from the corpus name alone, so a client reads only its
own documents from its own disk; nothing about the text is sent.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from memlm.distributed.fed_server import check_server_optimizer
from memlm.errors import MemlmError
from memlm.training.data import Document, load_corpus, split_documents

STRATEGIES = ("fedavg", "feddf", "fedavgm", "fedadam")
CLIENT_OPTIMIZERS = ("adamw", "sgd")
DEFAULT_SERVER_LR = {"fedavg": 1.0, "feddf": 1e-3, "fedavgm": 1.0, "fedadam": 5e-3}


@dataclass(frozen=True)
class FedConfig:
    clients: int = 4
    rounds: int = 5
    corpus: str = "shakespeare"
    strategy: str = "fedavg"          # fedavg | feddf | fedavgm | fedadam
    docs_per_client: int = 1          # whole documents (plays, books) each client holds
    public_docs: int = 1              # documents in the public shard (no client holds them)
    student: str = "layers=2,hidden=64,heads=2,kv_heads=1"
    vocab_size: int = 1024            # BPE trained on the public shard (ignored with a teacher)
    local_steps: int = 20
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3                  # the client optimizer's learning rate
    client_optimizer: str = "adamw"   # adamw | sgd (sgd: the client sends lr x its summed gradients)
    keep_optimizer: bool = True       # clients keep their AdamW moments across rounds (own state)
    server_steps: int = 20            # feddf: ensemble-distillation steps per round
    server_lr: float | None = None    # None: DEFAULT_SERVER_LR[strategy] (feddf: its distillation lr)
    server_momentum: float = 0.9      # fedavgm: momentum; fedadam: beta1
    server_beta2: float = 0.95        # fedadam: second-moment decay
    server_tau: float = 1e-7          # fedadam: adaptivity (added to sqrt(v))
    temperature: float = 1.0
    teacher: str | None = None        # clients distill this model on their own text (its tokenizer)
    alpha: float = 1.0                # weight of the teacher KL on clients
    eval_tokens: int = 16384          # held-out tokens scored after each round
    eval_every: int = 1               # score every N rounds (and always after the last)
    test_docs: int = 0                # documents nobody holds, scored once after the last round
    test_tokens: int = 65536          # test tokens scored (from the start of the test documents)
    seed: int = 0
    threads_per_client: int = 1
    out: str | None = None            # save the global student (a model dir) here

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise MemlmError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("clients", "rounds", "docs_per_client", "public_docs", "vocab_size", "local_steps",
                     "batch_size", "seq_len", "eval_tokens", "eval_every", "threads_per_client", "test_tokens"):
            if getattr(self, name) <= 0:
                raise MemlmError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.test_docs < 0:
            raise MemlmError(f"--test-docs must be 0 or more, got {self.test_docs}")
        if self.strategy == "feddf" and self.server_steps <= 0:
            raise MemlmError(f"--server-steps must be positive with --strategy feddf, got {self.server_steps}")
        if self.client_optimizer not in CLIENT_OPTIMIZERS:
            raise MemlmError(f"--client-optimizer must be one of {', '.join(CLIENT_OPTIMIZERS)}, "
                             f"got {self.client_optimizer!r}")
        if min(self.lr, self.temperature) <= 0:
            raise MemlmError(f"--lr and --temperature must be positive, got {self.lr} and {self.temperature}")
        if self.strategy == "fedavg" and self.server_lr is not None:
            raise MemlmError("--server-lr does nothing with --strategy fedavg: use fedavgm (--server-momentum 0 "
                             "for a plain scaled step), fedadam or feddf")
        check_server_optimizer(self.server_optimizer, self.server_learning_rate, self.server_momentum,
                               self.server_beta2, self.server_tau)

    @property
    def server_learning_rate(self) -> float:
        """--server-lr, or the strategy's default (fedavgm/fedadam: the server step; feddf: distillation)."""
        return DEFAULT_SERVER_LR[self.strategy] if self.server_lr is None else self.server_lr

    @property
    def server_optimizer(self) -> str:
        """The server's step on the clients' mean: fedavgm/fedadam, else plain FedAvg (feddf too)."""
        return self.strategy if self.strategy in ("fedavgm", "fedadam") else "fedavg"


@dataclass(frozen=True)
class Partition:
    public: list[Document]
    clients: list[list[Document]]
    heldout: list[Document]
    test: list[Document] = field(default_factory=list)


def partition(docs: list[Document], clients: int, docs_per_client: int, public_docs: int,
              test_docs: int = 0) -> Partition:
    """The fixed split of `docs` (see the module docstring).

    Raises:
        MemlmError: the corpus has too few training documents for the shards asked for.
    """
    train, heldout = split_documents(docs)
    if not heldout:
        raise MemlmError("the corpus needs at least two documents: one is held out for scoring")
    ranked = sorted(train, key=lambda d: hashlib.sha1(("fed:" + d.name).encode()).hexdigest())
    need = public_docs + clients * docs_per_client + test_docs
    if len(ranked) < need:
        test = f" + {test_docs} test" if test_docs else ""
        raise MemlmError(f"the corpus has {len(ranked)} training documents; {clients} clients x {docs_per_client} "
                         f"+ {public_docs} public{test} need {need}: use fewer --clients, --docs-per-client"
                         + (" or --test-docs" if test_docs else ""))
    shards = [ranked[public_docs + i * docs_per_client: public_docs + (i + 1) * docs_per_client]
              for i in range(clients)]
    return Partition(ranked[:public_docs], shards, heldout, ranked[len(ranked) - test_docs:] if test_docs else [])


def corpus_partition(cfg: FedConfig) -> Partition:
    return partition(load_corpus(cfg.corpus), cfg.clients, cfg.docs_per_client, cfg.public_docs, cfg.test_docs)


def tokenize(docs: list[Document], tokenizer) -> np.ndarray:
    """Documents joined by EOS (when the tokenizer has one) -> (n,) int64 token ids."""
    eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    ids: list[int] = []
    for d in docs:
        ids += list(tokenizer.encode(d.text)) + ([int(eos[0])] if eos else [])
    return np.asarray(ids, dtype=np.int64)


def public_tokenizer(public: list[Document], vocab_size: int):
    """A BPE trained on the public shard only: the server builds it without any client's text."""
    from memlm.training.data import TextTokenizer
    return TextTokenizer.train([d.text for d in public], vocab_size)
