"""Shared fixtures for the whole suite. pytest puts tests/ on sys.path (rootdir conftest), so
test modules import the support modules `helpers` (tiny HF / GGUF checkpoints) and
`engine_fakes` (byte tokenizer, tiny random models) directly, without editing sys.path.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Every test module runs on one torch thread.

    Test processes share the machine's 2 cores; OpenMP with 2 threads then busy-waits against
    the other process (a 16-token SmolLM2 decode goes from ~1 s to ~30 s), and tiny models gain
    nothing from two.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
