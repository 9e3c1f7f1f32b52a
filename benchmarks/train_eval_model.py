"""Held-out perplexity of saved models (any memlm model name or directory, e.g. the shipped
bf16 student) on exactly the windows `train_distill.py` evaluates: the first --eval-tokens of
the validation plays, tokenized with the teacher's (SmolLM2) tokenizer, in windows of --seq-len.

    python benchmarks/train_eval_model.py models/smollm2-distilled-17m --threads 1
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from memlm.loading import load_model
from memlm.training.data import eval_windows, prepare_tokens, tokenizer_fingerprint
from memlm.training.trainer import evaluate_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        lm = load_model(name)
        splits = prepare_tokens("shakespeare", lm.tokenizer, args.data_dir)
        val = eval_windows(splits.val, args.seq_len, args.eval_tokens)
        t0 = time.perf_counter()
        loss = evaluate_loss(lm.model.float().eval(), val, batch_size=4)
        print(f"{name}: held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f} over {val[:, 1:].numel()} tokens "
              f"of the validation plays ({lm.model.num_parameters() / 1e6:.2f}M params, tokenizer "
              f"{tokenizer_fingerprint(lm.tokenizer)}, {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
