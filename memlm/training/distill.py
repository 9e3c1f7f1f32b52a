"""Distillation losses and the objective that combines them.

Owns: cross-entropy, forward/reverse KL at a temperature (on the teacher's top-k or full
vocabulary), the hidden-state cosine term with its projection, and the check that teacher and
student share a tokenizer. Does not know: where teacher targets come from (a live teacher or
`teacher_cache.TeacherCache`), optimizers or data files.

    loss = alpha * T^2 * KL(teacher/T || student/T)       (reverse=True: KL(student || teacher))
         + beta  * CE(student, data)
         + gamma * (1 - cos(W h_student, h_teacher))        (only when a projection is configured)

Top-k KL (the cached form). A cache keeps the teacher's k largest logits per position and the
log-normalizer of its full distribution at the distillation temperature (lse_T = logsumexp(z/T)
over all V). So the teacher's probabilities of its top-k ids are exact, p_i = exp(z_i/T - lse_T),
and the mass of everything else is one "rest" bucket, p_rest = 1 - sum_k p_i. The student's
log-probabilities come from a log-softmax over the full vocabulary, gathered at the k ids, with
its own rest bucket q_rest = 1 - sum_k q_i. The loss is the exact KL between these (k+1)-bucket
distributions:

    forward  KL_k = sum_{i in topk} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)

It is a lower bound of the full KL and equals it when k = V. Without lse_T (an old cache), the
teacher is renormalized over its top-k and the rest bucket dropped; we measured that variant
pushing all of the student's mass at T=2 onto the k ids, which made the student overconfident
(held-out perplexity 3x worse than CE-only training), so the cache stores lse_T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.errors import MemlmError


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, V), targets (N,) -> mean cross-entropy (nats)."""
    return F.cross_entropy(logits.float(), targets)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped so a zero remainder stays finite."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            teacher_ids: torch.Tensor | None = None, temperature: float = 2.0,
            reverse: bool = False, teacher_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature-scaled KL, T^2 * mean over positions.

    Args:
        student_logits: (N, V).
        teacher_logits: (N, k) values at `teacher_ids`, or (N, V) when teacher_ids is None.
        teacher_ids: (N, k) vocabulary ids of the teacher's top-k, or None for the full vocab.
        teacher_lse: (N,) logsumexp of the teacher's full logits / T; with top-k ids it adds the
            "rest" bucket (exact teacher probabilities); None renormalizes over the k ids.
        reverse: KL(student || teacher) instead of KL(teacher || student).
    Returns: scalar tensor.
    """
    T = float(temperature)
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)        # (N, V)
    return kl_from_log_probs(log_q, teacher_logits, teacher_ids, T, reverse, teacher_lse)


def kl_from_log_probs(log_q: torch.Tensor, teacher_logits: torch.Tensor,
                      teacher_ids: torch.Tensor | None = None, temperature: float = 2.0,
                      reverse: bool = False, teacher_lse: torch.Tensor | None = None) -> torch.Tensor:
    """`kl_loss` given the student's log-probabilities at the temperature, log_softmax(z/T) (N, V),
    so a T = 1 objective shares one full-vocabulary log-softmax between its KL and CE terms."""
    T = float(temperature)
    if teacher_ids is None:                                           # full vocabulary
        log_p = F.log_softmax(teacher_logits.float() / T, dim=-1)
        kl = (log_q.exp() * (log_q - log_p)) if reverse else (log_p.exp() * (log_p - log_q))
        return kl.sum(-1).mean() * T * T
    log_q = log_q.gather(-1, teacher_ids.long())                      # (N, k)
    if teacher_lse is None:                                           # renormalized top-k
        log_p = F.log_softmax(teacher_logits.float() / T, dim=-1)
        if reverse:
            log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
        kl = (log_q.exp() * (log_q - log_p)) if reverse else (log_p.exp() * (log_p - log_q))
        return kl.sum(-1).mean() * T * T
    log_p = teacher_logits.float() / T - teacher_lse.float()[:, None]  # (N, k) exact
    log_p = torch.cat([log_p, _log1mexp(torch.logsumexp(log_p, -1, keepdim=True))], dim=-1)  # (N, k+1)
    log_q = torch.cat([log_q, _log1mexp(torch.logsumexp(log_q, -1, keepdim=True))], dim=-1)
    a, b = (log_q, log_p) if reverse else (log_p, log_q)
    kl = (a.exp() * (a - b)).sum(-1)
    return kl.mean() * T * T


def hidden_cosine_loss(student_h: torch.Tensor, teacher_h: torch.Tensor,
                       projection: nn.Module | None = None) -> torch.Tensor:
    """(N, Hs), (N, Ht) -> mean (1 - cos(proj(student_h), teacher_h))."""
    s = projection(student_h) if projection is not None else student_h
    return (1 - F.cosine_similarity(s.float(), teacher_h.float(), dim=-1)).mean()


@dataclass(frozen=True)
class DistillConfig:
    alpha: float = 1.0          # weight of the KL term
    beta: float = 1.0           # weight of the data cross-entropy
    gamma: float = 0.0          # weight of the hidden-state cosine (needs teacher hidden states)
    temperature: float = 1.0    # T = 1 measured best (BENCHMARKS.md, Training)
    reverse: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise MemlmError(f"distillation temperature must be positive, got {self.temperature}")
        if min(self.alpha, self.beta, self.gamma) < 0 or self.alpha + self.beta + self.gamma == 0:
            raise MemlmError("loss weights alpha/beta/gamma must be >= 0 and not all zero")


class DistillObjective(nn.Module):
    """Turns (student, batch with teacher targets) into one loss; owns the projection.

    The batch holds "input"/"target" (B, T) and, for distillation, "teacher_ids"/"teacher_logits"
    (B, T, k) (ids None = full vocab), optionally "teacher_lse" (B, T) at this temperature and
    "teacher_hidden" (B, T, Ht).
    """

    def __init__(self, cfg: DistillConfig, student_hidden: int = 0, teacher_hidden: int = 0):
        super().__init__()
        self.cfg = cfg
        self.projection = (nn.Linear(student_hidden, teacher_hidden, bias=False)
                           if cfg.gamma > 0 and student_hidden and teacher_hidden else None)

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        h = model.forward_dense(batch["input"])                             # (B, T, H)
        logits = model.compute_logits(h.reshape(-1, h.shape[-1]))           # (B*T, V)
        parts = {}
        want_ce = self.cfg.beta > 0 or "teacher_logits" not in batch
        want_kl = "teacher_logits" in batch and self.cfg.alpha > 0
        # at T = 1 the KL and the CE use the same log-softmax: compute the (N, V) pass once
        log_q = F.log_softmax(logits.float(), dim=-1) if want_kl and self.cfg.temperature == 1.0 else None
        if want_ce:
            target = batch["target"].reshape(-1)
            parts["ce"] = ce_loss(logits, target) if log_q is None else F.nll_loss(log_q, target)
        if want_kl:
            t_logits = batch["teacher_logits"]
            t_ids = batch.get("teacher_ids")
            lse = batch.get("teacher_lse")
            args = (t_logits.reshape(-1, t_logits.shape[-1]),
                    None if t_ids is None else t_ids.reshape(-1, t_ids.shape[-1]),
                    self.cfg.temperature, self.cfg.reverse, None if lse is None else lse.reshape(-1))
            parts["kl"] = kl_loss(logits, *args) if log_q is None else kl_from_log_probs(log_q, *args)
        if self.projection is not None and batch.get("teacher_hidden") is not None:
            th = batch["teacher_hidden"]
            parts["cos"] = hidden_cosine_loss(h.reshape(-1, h.shape[-1]), th.reshape(-1, th.shape[-1]),
                                              self.projection)
        if "teacher_logits" not in batch:            # plain language-model training
            return parts["ce"], {k: float(v.detach()) for k, v in parts.items()}
        weights = {"ce": self.cfg.beta, "kl": self.cfg.alpha, "cos": self.cfg.gamma}
        loss = sum(weights[k] * v for k, v in parts.items())
        return loss, {k: float(v.detach()) for k, v in parts.items()}


def check_tokenizers(teacher_tok, student_tok, teacher_vocab: int, student_vocab: int) -> None:
    """Refuse distillation across tokenizers: KL over ids is meaningless if ids differ.

    Raises:
        MemlmError: vocab sizes differ, or the two tokenizers encode a probe text differently.
    """
    from memlm.training.data import tokenizer_fingerprint
    if teacher_vocab != student_vocab:
        raise MemlmError(f"tokenizer mismatch: teacher vocabulary {teacher_vocab} != student vocabulary "
                         f"{student_vocab}; build the student with the teacher's tokenizer")
    if student_tok is not None and teacher_tok is not None and \
            tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise MemlmError("tokenizer mismatch: teacher and student tokenizers encode the same text "
                         "differently; build the student with the teacher's tokenizer")
