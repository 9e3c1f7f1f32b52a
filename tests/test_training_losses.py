"""Distillation losses against hand-computed values, and the tokenizer-mismatch refusal."""
import math

import pytest
import torch

from memlm.errors import MemlmError
from memlm.training.distill import (DistillConfig, DistillObjective, ce_loss, check_tokenizers,
                                    hidden_cosine_loss, kl_loss)

LN = math.log


def test_ce_hand_computed():
    logits = torch.tensor([[0.0, LN(3)]])              # p = [1/4, 3/4]
    assert float(ce_loss(logits, torch.tensor([1]))) == pytest.approx(LN(4 / 3))
    assert float(ce_loss(logits, torch.tensor([0]))) == pytest.approx(LN(4))


def test_forward_kl_full_vocab_t2():
    student = torch.tensor([[0.0, 2 * LN(3)]])         # at T=2: q = [1/4, 3/4]
    teacher = torch.tensor([[0.0, 0.0]])               # p = [1/2, 1/2]
    # T^2 * (1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4)) = 4 * 1/2 ln(4/3)
    assert float(kl_loss(student, teacher, temperature=2.0)) == pytest.approx(2 * LN(4 / 3), rel=1e-6)


def test_reverse_kl_full_vocab_t2():
    student = torch.tensor([[0.0, 2 * LN(3)]])
    teacher = torch.tensor([[0.0, 0.0]])
    # T^2 * (1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2)) = 4 * (3/4 ln 3/2 - 1/4 ln 2) = ln(27/16)
    got = float(kl_loss(student, teacher, temperature=2.0, reverse=True))
    assert got == pytest.approx(LN(27 / 16), rel=1e-6)


def test_topk_kl_renormalizes_teacher_not_student():
    student = torch.zeros(1, 4)                        # q = 1/4 on every id of the full vocab
    ids = torch.tensor([[2, 0]])
    vals = torch.tensor([[LN(3), 0.0]])                # teacher over its top-2: [3/4, 1/4]
    # forward: 3/4 ln(3/4 / 1/4) + 1/4 ln(1/4 / 1/4) = 3/4 ln 3
    assert float(kl_loss(student, vals, ids, temperature=1.0)) == pytest.approx(0.75 * LN(3), rel=1e-6)
    # reverse: student renormalized on {2, 0} = [1/2, 1/2]: 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert float(kl_loss(student, vals, ids, temperature=1.0, reverse=True)) == pytest.approx(0.5 * LN(4 / 3), rel=1e-6)


def test_topk_with_k_equal_vocab_is_full_kl():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    vals, ids = t.topk(7, dim=-1)
    assert float(kl_loss(s, vals, ids, 2.0)) == pytest.approx(float(kl_loss(s, t, None, 2.0)), rel=1e-5)
    full = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1),
                                      log_target=True, reduction="batchmean") * 4
    assert float(kl_loss(s, t, None, 2.0)) == pytest.approx(float(full), rel=1e-5)


def test_hidden_cosine_with_projection():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert float(hidden_cosine_loss(s, t, proj).detach()) == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


class _Model(torch.nn.Module):
    """forward_dense returns fixed hidden states; logits = hidden (identity head)."""

    def __init__(self, h):
        super().__init__()
        self.h = h

    def forward_dense(self, ids):
        return self.h

    def compute_logits(self, h):
        return h


def test_objective_combines_weighted_terms():
    h = torch.tensor([[[0.0, 2 * LN(3)]]])              # (B=1, T=1, V=2)
    batch = {"input": torch.zeros(1, 1, dtype=torch.long), "target": torch.tensor([[1]]),
             "teacher_ids": None, "teacher_logits": torch.tensor([[[0.0, 0.0]]])}
    obj = DistillObjective(DistillConfig(alpha=1.0, beta=0.5, temperature=2.0))
    loss, parts = obj(_Model(h), batch)
    ce = -math.log(9 / 10)                              # logits [0, ln 9] at T=1: p1 = 9/10
    assert parts["kl"] == pytest.approx(2 * LN(4 / 3), rel=1e-6) and parts["ce"] == pytest.approx(ce, rel=1e-6)
    assert float(loss) == pytest.approx(2 * LN(4 / 3) + 0.5 * ce, rel=1e-6)


def test_bad_distill_config():
    with pytest.raises(MemlmError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(MemlmError, match="not all zero"):
        DistillConfig(alpha=0, beta=0, gamma=0)


class _Tok:
    def __init__(self, shift, vocab=300):
        self.shift, self.vocab_size = shift, vocab

    def encode(self, text):
        return [(ord(c) + self.shift) % self.vocab_size for c in text]


def test_tokenizer_mismatch_is_refused():
    with pytest.raises(MemlmError, match="tokenizer mismatch: teacher vocabulary 49152 != student vocabulary 32000"):
        check_tokenizers(None, None, 49152, 32000)
    with pytest.raises(MemlmError, match="encode the same text differently"):
        check_tokenizers(_Tok(0), _Tok(1), 300, 300)
    check_tokenizers(_Tok(0), _Tok(0), 300, 300)        # same mapping: accepted


def test_topk_kl_with_rest_bucket_hand_computed():
    # teacher p = [1/2, 1/4, 1/8, 1/8] (logits = log p, lse = 0); top-2 = ids 0, 1; rest = 1/4
    # student uniform: q0 = q1 = 1/4, q_rest = 1/2
    student = torch.zeros(1, 4)
    ids, vals, lse = torch.tensor([[0, 1]]), torch.tensor([[LN(1 / 2), LN(1 / 4)]]), torch.tensor([0.0])
    # forward: 1/2 ln(2) + 1/4 ln(1) + 1/4 ln(1/2) = 1/4 ln 2
    assert float(kl_loss(student, vals, ids, 1.0, teacher_lse=lse)) == pytest.approx(0.25 * LN(2), rel=1e-5)
    # reverse: 1/4 ln(1/2) + 1/4 ln(1) + 1/2 ln(2) = 1/4 ln 2
    assert float(kl_loss(student, vals, ids, 1.0, reverse=True, teacher_lse=lse)) == pytest.approx(0.25 * LN(2), rel=1e-5)


def test_rest_bucket_kl_equals_full_kl_when_k_is_vocab():
    torch.manual_seed(1)
    s, t = torch.randn(6, 9), torch.randn(6, 9)
    vals, ids = t.topk(9, dim=-1)
    lse = torch.logsumexp(t / 2, dim=-1)
    for rev in (False, True):
        full = float(kl_loss(s, t, None, 2.0, reverse=rev))
        assert float(kl_loss(s, vals, ids, 2.0, reverse=rev, teacher_lse=lse)) == pytest.approx(full, rel=1e-4, abs=1e-5)
    # and a lower bound of it for k < V
    v3, i3 = t.topk(3, dim=-1)
    assert float(kl_loss(s, v3, i3, 2.0, teacher_lse=lse)) <= float(kl_loss(s, t, None, 2.0)) + 1e-6


def test_objective_at_t1_shares_one_log_softmax_with_the_same_values():
    # logits [0, ln 3] at T = 1: q = [1/4, 3/4]; teacher [1/2, 1/2] on both ids (k = V = 2)
    h = torch.tensor([[[0.0, LN(3)]]])
    batch = {"input": torch.zeros(1, 1, dtype=torch.long), "target": torch.tensor([[1]]),
             "teacher_ids": torch.tensor([[[0, 1]]]), "teacher_logits": torch.tensor([[[0.0, 0.0]]]),
             "teacher_lse": torch.tensor([[LN(2)]])}
    loss, parts = DistillObjective(DistillConfig(alpha=1.0, beta=0.5, temperature=1.0))(_Model(h), batch)
    kl = 0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5) and parts["ce"] == pytest.approx(-LN(0.75), rel=1e-6)
    assert float(loss) == pytest.approx(kl - 0.5 * LN(0.75), rel=1e-5)
    assert float(kl_loss(h[0], batch["teacher_logits"][0], batch["teacher_ids"][0], 1.0,
                         teacher_lse=batch["teacher_lse"][0])) == pytest.approx(kl, rel=1e-5)
