import pytest

from memlm.config import ModelConfig, format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)),
    ("100MB", 100 * 10**6), ("3GB", 3 * 10**9), ("64KiB", 65536), ("4096", 4096), ("10KB", 10_000),
    ("7B", 7), (123, 123),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "2 parsecs", "-1GiB", "0", 0, -5])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size():
    assert format_size(1536) == "1.5 KiB"
    assert format_size(100) == "100 B"
    assert format_size(3 * 2**30) == "3.0 GiB"


def test_model_config_defaults_and_derived():
    cfg = ModelConfig(vocab_size=10, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2)
    assert cfg.head_dim == 8 and cfg.intermediate_size == 256
    assert cfg.mixers == ("attention", "attention") and cfg.layer_order == (0, 1)
    assert cfg.kv_bytes_per_token == 2 * 2 * 2 * 8 * 4
    shared = cfg.replace(layer_order=(0, 0, 1, 1), mixers=("attention", "recurrent"))
    assert shared.depth == 4 and shared.attention_depths == (0, 1)
    assert ModelConfig.from_dict(shared.to_dict()) == shared


@pytest.mark.parametrize("changes,match", [
    ({"num_heads": 5}, "divisible"),
    ({"num_kv_heads": 3}, "multiple"),
    ({"norm": "batch"}, "norm"),
    ({"mixers": ("attention",)}, "mixers"),
    ({"layer_order": (0, 2)}, "layer_order"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_model_config_validation(changes, match):
    base = dict(vocab_size=10, hidden_size=64, num_layers=2, num_heads=8)
    base.update(changes)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**base)
