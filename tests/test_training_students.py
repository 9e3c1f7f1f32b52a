"""Students from specs, sharing and repetition, the `--fit` search and its errors."""
import pytest
import torch

from memlm.errors import MemlmError
from memlm.models import Transformer
from memlm.models.kv import ContiguousCache
from memlm.training.students import (STUDENT_PRESETS, count_parameters, describe_fit, fit_student,
                                     parse_student)


def test_spec_parsing_mixers_and_sharing():
    cfg = parse_student("layers=6,hidden=64,heads=4,kv_heads=2,mixers=AAR..,share=repeat2", 100)
    assert cfg.num_layers == 3 and cfg.layer_order == (0, 0, 1, 1, 2, 2)
    assert cfg.mixers == ("attention", "attention", "recurrent") and cfg.num_kv_heads == 2
    albert = parse_student("layers=4,hidden=64,heads=2,share=all", 100)
    assert albert.num_layers == 1 and albert.layer_order == (0, 0, 0, 0)
    assert parse_student("tiny", 100).hidden_size == STUDENT_PRESETS["tiny"][1]
    assert parse_student("preset=mini,layers=2", 100).depth == 2
    assert not parse_student("hidden=64,heads=2,tie=0", 100).tie_word_embeddings


@pytest.mark.parametrize("spec,msg", [
    ("layers=5,share=repeat2", "not a multiple of 2"),
    ("mixers=AX", "use letters A"),
    ("share=some", "repeatN"),
    ("width=3", "bad student spec item"),
    ("hidden=65,heads=2", "not a valid model"),
    ("huge", "bad student spec item"),
    ("preset=huge", "unknown student preset"),
    ("layers=two", "bad number"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(MemlmError, match=msg):
        parse_student(spec, 100)


@pytest.mark.parametrize("spec", ["layers=4,hidden=32,heads=2,mixers=AR,share=repeat2",
                                  "layers=3,hidden=32,heads=2,share=all,mlp=gelu,tie=0"])
def test_parameter_count_matches_model(spec):
    cfg = parse_student(spec, 50)
    assert count_parameters(cfg) == Transformer(cfg).num_parameters()


def test_recurrent_student_reference_path_matches_dense():
    torch.manual_seed(0)
    cfg = parse_student("layers=4,hidden=32,heads=2,mixers=RA,share=repeat2", 50)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 50, (20,))
    with torch.no_grad():
        dense = model.forward_dense(ids[None])[0]
        cache = ContiguousCache(cfg.num_kv_heads, cfg.head_dim, cfg.depth, 32)
        steps = []
        for chunk in (ids[:7], ids[7:8], ids[8:20]):        # prefill, one token, a chunk
            start = cache.length
            cache.begin_step(len(chunk))
            steps.append(model.forward(chunk, torch.arange(start, start + len(chunk)), cache))
            cache.end_step()
    assert torch.allclose(torch.cat(steps), dense, atol=1e-4)


def test_fit_picks_largest_that_fits_and_explains():
    choice, candidates = fit_student("64MiB", 49152, context=2048)
    assert choice.total <= 64 * 2**20 and choice.cfg.tie_word_embeddings and choice.cfg.vocab_size == 49152
    fitting = [c for c in candidates if c.total <= 64 * 2**20]
    body = lambda c: count_parameters(c.cfg) - 49152 * c.cfg.hidden_size
    assert body(choice) == max(body(c) for c in fitting)
    assert choice.weight_bytes == 4 * count_parameters(choice.cfg)
    assert choice.kv_bytes == 2048 * choice.cfg.kv_bytes_per_token
    text = describe_fit(choice, "64MiB", 2048)
    assert "weights" in text and "KV" in text and "64.0 MiB" in text
    int8, _ = fit_student("64MiB", 49152, context=2048, weight_dtype="int8")
    assert count_parameters(int8.cfg) > count_parameters(choice.cfg)


def test_fit_too_small_names_the_smallest():
    with pytest.raises(MemlmError, match=r"--fit 4.0 MiB is smaller than the smallest student \(nano,layers=2: 13.4 MiB"):
        fit_student("4MiB", 49152)
    with pytest.raises(MemlmError, match="weight-dtype"):
        fit_student("64MiB", 49152, weight_dtype="fp8")


def test_embedding_from_teacher_keeps_the_teacher_geometry():
    import torch
    from memlm.models import Transformer
    from memlm.training.students import init_embedding_from_teacher
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8))[0][:, :2]                   # a 2-D subspace of R^8
    teacher = torch.randn(40, 2) @ basis.T * 3                              # (V=40, Ht=8), rank 2
    student = Transformer(parse_student("layers=1,hidden=2,heads=1,kv_heads=1,ffn=4", 40))
    init_embedding_from_teacher(student, teacher, std=0.02)
    e = student.embed.weight.detach()
    assert float(e.std()) == pytest.approx(0.02, rel=1e-4)
    gram_t, gram_s = teacher @ teacher.T, e @ e.T                           # rank 2: PCA keeps it exactly
    assert torch.allclose(gram_s / gram_s.norm(), gram_t / gram_t.norm(), atol=1e-4)
    with pytest.raises(MemlmError, match="at least the student's width"):
        init_embedding_from_teacher(student, torch.randn(40, 1))
