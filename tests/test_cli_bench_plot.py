"""`memlm bench --plot`: the memory timeline of a chat workload, drawn to a PNG (tiny model)."""
from __future__ import annotations

import pytest

from helpers import make_tiny_hf_llama

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("plot-model"))


def test_plot_draws_every_tier_from_per_step_samples(tiny, tmp_path, capsys):
    from memlm.entrypoints.cli import main
    png = tmp_path / "memory.png"
    rc = main(["bench", "--plot", str(png), "--model", str(tiny), "--memory-budget", "1GiB",
               "--conversations", "2", "--turns", "2", "--one-off", "1", "--max-tokens", "4",
               "--session-dir", str(tmp_path / "sessions")])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"wrote {png}" in out and "memory budget" in out and "warm tier" in out
    steps = int(out.split(": ", 1)[1].split(" steps")[0])
    assert steps >= 2 * 4                       # at least one step per reply token per turn
    assert list((tmp_path / "sessions").glob("s-plot-*.kv"))    # the cold tier was written


def test_timeline_samples_hot_prefix_warm_and_cold(tiny, tmp_path):
    """The samples see KV in use while requests run, then the finished turns' blocks as cached
    prefix, the sessions in the warm tier and on disk; the stack stays inside the budget."""
    from memlm import LLM
    from memlm.entrypoints.cli import bench_plot
    llm = LLM(str(tiny), memory_budget="1GiB", session_dir=str(tmp_path / "s"), warm_fraction=0.2,
              max_num_seqs=3, verbose=False)
    samples = bench_plot.run_timeline(llm, conversations=2, turns=2, one_off=1, max_tokens=4)
    llm.engine.offload.cold.flush()
    assert max(s["hot"] for s in samples) > 0
    assert max(s["prefix"] for s in samples) > 0
    assert max(s["warm"] for s in samples) > 0
    assert bench_plot.sample(llm.engine, 0.0)["cold"] > 0
    budget = llm.engine.plan.total
    for s in samples:
        stacked = sum(s[k] for k, _, _ in bench_plot.LAYERS)
        assert stacked <= budget and s["rss"] <= budget
        assert s["hot"] + s["prefix"] + s["pool_free"] == llm.engine.plan.kv_pool


@pytest.mark.parametrize("argv, message", [
    (["--plot", "memory.txt"], "ending in .png"),
    (["--plot", "m.png", "--turns", "0"], "must be >= 1"),
])
def test_plot_refuses_bad_arguments_in_one_line(tiny, tmp_path, capsys, argv, message):
    from memlm.entrypoints.cli import main
    assert main(["bench", *argv, "--model", str(tiny)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
