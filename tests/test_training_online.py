"""Online learning: tailing a growing file, test-then-train, replay and LR re-warming."""
import threading
import time

import pytest
import torch

from memlm.config import ModelConfig
from memlm.errors import MemlmError
from memlm.models import Transformer
from memlm.training.data import TextTokenizer
from memlm.training.online import OnlineConfig, OnlineLearner, stream_chunks


def test_stream_tails_a_growing_file(tmp_path):
    f = tmp_path / "s.txt"
    first = "".join(f"line {i}\n" for i in range(40))
    f.write_text(first)
    more = "".join(f"late {i}\n" for i in range(30))

    def append():
        time.sleep(0.15)
        with open(f, "a") as fh:
            fh.write(more)
    th = threading.Thread(target=append)
    th.start()
    chunks = list(stream_chunks(str(f), chunk_chars=100, poll_s=0.02, max_wait_s=0.5))
    th.join()
    assert "".join(chunks) == first + more
    assert all(c.endswith("\n") for c in chunks) and max(map(len, chunks)) <= 100
    assert len(list(stream_chunks(str(f), chunk_chars=100, max_wait_s=0.0, max_chunks=2))) == 2
    with pytest.raises(MemlmError, match="not a file"):
        list(stream_chunks(str(tmp_path / "missing.txt")))


def test_stdin_stream(monkeypatch):
    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\n" * 150))
    assert "".join(stream_chunks("-", chunk_chars=64)) == "a\n" * 150


def test_test_then_train_beats_frozen_on_a_shifted_stream():
    torch.manual_seed(0)
    text_a = "the cat sat on the mat. " * 40
    text_b = "0123456789 abcdef " * 60
    tok = TextTokenizer.train([text_a, text_b], vocab_size=300)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                                    intermediate_size=64))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    learner = OnlineLearner(model, tok, OnlineConfig(lr=1e-2, warmup=2, steps_per_chunk=4, batch_size=4,
                                                     seq_len=16, replay_windows=8))
    for _ in range(3):
        learner.process(text_a[:300])
    for _ in range(4):
        learner.process(text_b[:300])
    rep = learner.report
    assert rep.chunks == 7 and rep.steps == 28 and 0 in rep.rewarms
    assert rep.ppl_model < 0.8 * rep.ppl_frozen
    assert len(learner.replay) == 8                      # bounded
    assert all(torch.equal(start[k], v) for k, v in learner.frozen.state_dict().items())
    assert not torch.equal(start["embed.weight"], model.embed.weight)
