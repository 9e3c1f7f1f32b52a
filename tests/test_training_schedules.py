"""LR schedules: exact values of the pure functions and the plateau controller's state."""
import math

import pytest

from memlm.training.schedules import PlateauController, constant, cosine, make_schedule, wsd


def test_constant_with_warmup():
    assert [constant(s, lr=1.0, warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert constant(0, lr=0.1) == 0.1


def test_cosine_exact_values():
    f = lambda s: cosine(s, lr=1.0, total=10, warmup=2, min_ratio=0.0)
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == 1.0
    assert f(6) == pytest.approx(0.5)                  # halfway through the decay
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(10) == pytest.approx(0.0) and f(50) == pytest.approx(0.0)
    assert cosine(10, lr=2.0, total=10, min_ratio=0.1) == pytest.approx(0.2)


def test_wsd_exact_values():
    f = lambda s: wsd(s, lr=1.0, total=10, warmup=2, decay_fraction=0.2, min_ratio=0.0)
    assert [f(s) for s in range(11)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.5, 0.0])
    assert wsd(10, lr=1.0, total=10, decay_fraction=0.5, min_ratio=0.1) == pytest.approx(0.1)


def test_plateau_controller_cuts_and_rewarms():
    c = PlateauController(lr=1.0, warmup=2, patience=2, factor=0.5, threshold=0.01)
    assert c.lr_at(0) == 0.5 and c.lr_at(5) == 1.0
    assert c.observe(3.0) is False                     # first loss: the best so far
    assert c.observe(2.5) is False                     # > 1% better: progress
    assert c.observe(2.49) is False                    # < 1% better: first bad evaluation
    assert c.observe(2.6) is True                      # second bad one: cut
    assert c.lr_at(100) == 0.5 and c.bad_evals == 0
    c.rewarm(20, warmup=4)
    assert c.lr_at(20) == 0.25 and c.lr_at(23) == 1.0 and math.isinf(c.best)


def test_controller_state_round_trip():
    import json
    c = PlateauController(lr=0.1, warmup=3, patience=1)
    c.observe(2.0), c.observe(2.1)
    d = PlateauController(lr=0.1)
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d == c
    fresh = PlateauController(lr=0.1)
    fresh.load_state_dict(json.loads(json.dumps(PlateauController(lr=0.1).state_dict())))
    assert math.isinf(fresh.best)


def test_make_schedule_by_name():
    assert make_schedule("cosine", lr=1.0, total=10).lr_at(0) == 1.0
    assert isinstance(make_schedule("adaptive", lr=1.0, total=10), PlateauController)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", lr=1.0, total=10)
