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


def _touch(n: int) -> None:
    """Raise this process's RSS by about n bytes for a moment (pages written, then unmapped)."""
    import mmap
    with mmap.mmap(-1, n) as pages:
        for i in range(0, n, mmap.PAGESIZE):
            pages[i] = 1


def test_phase_peak_sees_only_its_phase_and_keeps_the_process_peak():
    _touch(160 * 2**20)
    mark = mem.peak_rss()
    assert mark >= mem.current_rss() + 150 * 2**20
    with mem.phase_peak() as phase:
        _touch(16 * 2**20)
    assert phase.isolated, "Linux clear_refs is needed for this test"
    assert mem.current_rss() + 12 * 2**20 <= phase.peak < mark - 100 * 2**20   # counters lag a little
    assert mem.peak_rss() >= mark - 2**20          # put back (to within the kernel counters' slack)


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_memory_budget import _touch
from memlm import LLM
from memlm.memory import budget as mem
_touch(400 * 2**20)                       # a peak above anything the engine's start-up reaches
seen = mem.peak_rss()
llm = LLM({model!r}, memory_budget="2GiB", verbose=False)
print(json.dumps({{"seen": seen, "workspace": llm.engine.plan.workspace, "load_peak": llm.budget.load_peak}}))
"""


def test_the_kernel_peak_that_wait4_reports_is_not_hidden_by_the_engines_measurements(tmp_path):
    """A child touches 400 MiB, frees it, then loads a tiny model through the engine, whose load
    and start-up profile each measure their own peak: wait4 still reports the 400 MiB peak (it
    reported only the peak since the profile's reset before), and neither phase counts it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import make_tiny_hf_llama
    model = str(make_tiny_hf_llama(tmp_path))
    code = _CHILD.format(tests=str(Path(__file__).parent), model=model)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, out
    res = json.loads(out.strip().splitlines()[-1])
    assert usage.ru_maxrss * 1024 >= res["seen"] - 2**20, (usage.ru_maxrss, res)
    assert res["load_peak"] < res["seen"] - 200 * 2**20 and res["workspace"] < 200 * 2**20, res
