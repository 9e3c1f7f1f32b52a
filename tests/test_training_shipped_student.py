"""The distilled student committed under models/: self-contained, within the 50 MB budget, loads
with memlm's loader (bf16 safetensors, no pickle) and generates through the paged engine."""
from pathlib import Path

import pytest
import torch
from helpers import budget_above_rss

from memlm import LLM, SamplingParams
from memlm.training.data import tokenizer_fingerprint

STUDENT = Path(__file__).resolve().parents[1] / "models" / "smollm2-distilled-17m"


def test_shipped_student_is_self_contained_and_small():
    names = {p.name for p in STUDENT.iterdir()}
    assert {"memlm_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names) and "train_state" not in names
    assert sum(p.stat().st_size for p in STUDENT.iterdir()) <= 50 * 10**6


def test_shipped_student_generates():
    before = torch.get_num_threads()
    try:
        llm = LLM(str(STUDENT), memory_budget=budget_above_rss(), verbose=False, num_threads=1,
                  num_kv_blocks=16)
        out = llm.generate("ROMEO.\n", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    finally:
        torch.set_num_threads(before)
    assert len(out.token_ids) == 8 and out.text.strip()
    # the teacher's tokenizer (SmolLM2's fingerprint, as recorded in the teacher cache's meta.json)
    assert llm.config.vocab_size == 49152 and tokenizer_fingerprint(llm.tokenizer) == "a464a4f5e396"
