import pytest

from memlm.errors import OutOfBudgetError
from memlm.memory import budget as mem


def test_probes_report_this_process():
    assert 10 * 2**20 < mem.current_rss() <= mem.peak_rss()


def test_budget_below_baseline_fails_at_once_with_needed_size():
    with pytest.raises(OutOfBudgetError, match="use at least"):
        mem.MemoryBudget.create("10MiB", verbose=False)


def test_default_budget_is_a_fraction_of_available_ram():
    b = mem.MemoryBudget.create(None, verbose=False)
    assert b.defaulted and b.total <= mem.available_ram()


def test_load_size_is_read_from_headers_and_refused_before_loading(tmp_path, monkeypatch):
    """The estimate equals the loaded fp32 weights; a budget that cannot hold them refuses
    before a single weight is read."""
    import torch

    from helpers import make_tiny_hf_llama
    from memlm import LLM
    from memlm.loading import estimate_load_bytes, load_model
    path = make_tiny_hf_llama(tmp_path)
    weights, largest = estimate_load_bytes(path)
    loaded = load_model(path)
    assert weights == sum(p.numel() * 4 for p in loaded.model.state_dict().values())
    assert largest == max(p.numel() * 4 for p in loaded.model.state_dict().values())
    state = loaded.model.state_dict().values()            # bf16: matrices halve, norms stay fp32;
    bf16 = sum(p.numel() * (2 if p.dim() == 2 else 4) for p in state)   # the transient copy is fp32
    assert estimate_load_bytes(path, torch.bfloat16) == (bf16, largest)
    assert estimate_load_bytes(tmp_path / "missing") is None

    huge = 64 * 2**30                                        # pretend the file holds 64 GiB
    monkeypatch.setattr("memlm.loading.estimate_load_bytes", lambda *a, **k: (huge, 2**20))

    def never(*a, **k):
        raise AssertionError("the loader ran")
    monkeypatch.setattr("memlm.loading.load_model", never)
    with pytest.raises(OutOfBudgetError, match=r"loading .* over the 2\.0 GiB budget; use --memory-budget"):
        LLM(str(path), memory_budget="2GiB", verbose=False)
