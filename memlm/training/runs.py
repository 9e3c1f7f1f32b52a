"""Typed configs of the training commands (`TrainRun`, `DistillRun`, `OnlineRun`, `EvalRun`) and
the steps their runs share: loading a model by name and reporting/exporting a finished run.

Owns: what one run of `memlm train | distill | eval` is made of, the defaults of those commands
(their argparse help reads them from here) and every check that needs no file or model, each a
one-line `MemlmError` naming the flag. Does not know: argparse (the CLI,
`memlm.entrypoints.cli.train`, builds these from its flags), process-wide settings such as the
thread count (the CLI applies them), or the work itself (`train_run`, `distill_run`).

    flags --(CLI)--> TrainRun / DistillRun / OnlineRun / EvalRun --> run_train / run_distill / ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from memlm.errors import MemlmError
from memlm.models.registry import DEFAULT_MODEL
from memlm.training.data import VAL_FRACTION
from memlm.training.distill import DistillConfig
from memlm.training.evaluate import CONTEXT, EVAL_CHUNK
from memlm.training.online import CHUNK_CHARS, MAX_WAIT_S, POLL_S, OnlineConfig
from memlm.training.students import DEFAULT_STUDENT, FIT_CONTEXT, FIT_WEIGHT_DTYPE, parse_weight_dtype
from memlm.training.teacher_cache import TOP_K
from memlm.training.trainer import TrainConfig

DEFAULT_TEACHER = DEFAULT_MODEL          # the embedded SmolLM2: teacher, and tokenizer of a new student
DEFAULT_CORPUS = "shakespeare"
TRAIN_LOOP = TrainConfig(steps=500, seq_len=256)     # the commands train longer than the library default
DISTILL_LOOP = replace(TRAIN_LOOP, lr=2e-3)
# benchmarks/RESULTS-train.md: a peak LR of 1e-5 kept forgetting < 2%; batches are the loop's.
ONLINE_LEARNER = OnlineConfig(lr=1e-5, batch_size=TRAIN_LOOP.batch_size, seq_len=TRAIN_LOOP.seq_len,
                              replay_fraction=0.875)


def _positive(value, flag: str, optional: bool = False) -> None:
    if (value is not None or not optional) and not value > 0:
        raise MemlmError(f"{flag} must be positive, got {value}")


@dataclass(frozen=True)
class LoopRun:
    """What `train` and `distill` share: the corpus, the loop and where the result goes."""
    corpus: str = DEFAULT_CORPUS          # a corpus name, a text file or a directory of .txt files
    data_dir: str | None = None           # token/teacher cache root (None: ~/.cache/memlm/data)
    val_fraction: float = VAL_FRACTION    # share of documents held out
    loop: TrainConfig = TRAIN_LOOP
    out: str | None = None                # checkpoint directory (a model dir the loader reads)
    resume: bool = False                  # continue from the checkpoint in `out`
    export_hf: str | None = None          # also write a transformers-readable copy here
    log_file: str | None = None           # append one JSON line per optimizer step (loss, lr, ...)

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise MemlmError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.resume and not self.out:
            raise MemlmError("--resume needs --out (the checkpoint to continue)")


@dataclass(frozen=True)
class TrainRun(LoopRun):
    """`memlm train`: a new student (or `model`) trained with cross-entropy on `corpus`."""
    student: str = DEFAULT_STUDENT        # preset or spec (`students.parse_student`)
    model: str | None = None              # start from this model instead of a new student
    tokenizer: str = DEFAULT_TEACHER      # of a new student: a model name/dir, or bpe:N

    def __post_init__(self):
        super().__post_init__()
        if self.tokenizer.startswith("bpe:") and not self.tokenizer[4:].isdigit():
            raise MemlmError(f"--tokenizer {self.tokenizer!r}: bpe:N needs a vocabulary size, e.g. bpe:2048")


@dataclass(frozen=True)
class DistillRun(LoopRun):
    """`memlm distill`: a student (given, fitted to a budget, or initialised from a model)
    trained on a teacher's logits."""
    loop: TrainConfig = DISTILL_LOOP
    teacher: str = DEFAULT_TEACHER
    student: str | None = None            # preset or spec (vocabulary is the teacher's); None: tiny
    init: str | None = None               # start the student from this model (same tokenizer)
    fit: str | None = None                # pick the largest student whose weights + KV fit, e.g. 64MiB
    fit_context: int = FIT_CONTEXT        # tokens of KV (batch 1) `fit` reserves
    weight_dtype: str = FIT_WEIGHT_DTYPE  # bytes per weight `fit` assumes; canonical after init
    plan: bool = False                    # print the student that would be trained and stop
    objective: DistillConfig = DistillConfig()
    top_k: int = TOP_K                    # teacher logits kept per position in the cache
    no_cache: bool = False                # run the teacher live on full logits
    cache_dir: str | None = None          # teacher cache (None: under the data dir)
    teacher_windows: int | None = None    # windows the teacher pass covers (None: all training tokens)

    def __post_init__(self):
        super().__post_init__()
        given = [n for n, v in (("--fit", self.fit), ("--student", self.student), ("--init", self.init)) if v]
        if len(given) > 1:
            raise MemlmError(f"give only one of --fit, --student, --init (got {' and '.join(given)})")
        object.__setattr__(self, "weight_dtype", parse_weight_dtype(self.weight_dtype))
        _positive(self.fit_context, "--fit-context")
        _positive(self.top_k, "--top-k")
        _positive(self.teacher_windows, "--teacher-windows", optional=True)


@dataclass(frozen=True)
class OnlineRun:
    """`memlm train --online`: test-then-train `model` on a growing text stream."""
    model: str | None = None              # required: the model to keep training
    stream: str = "-"                     # a file being appended to, or - for stdin
    max_chunks: int | None = None
    chunk_chars: int = CHUNK_CHARS
    poll_s: float = POLL_S
    max_wait_s: float = MAX_WAIT_S        # stop after this long without new text
    replay_corpus: str | None = None      # seed the replay buffer with this corpus's train split
    data_dir: str | None = None
    learner: OnlineConfig = ONLINE_LEARNER
    out: str | None = None                # save the adapted model here

    def __post_init__(self):
        if not self.model:
            raise MemlmError("--online needs --model: the model to keep training (e.g. a --out of `memlm train`)")
        _positive(self.chunk_chars, "--chunk-chars")
        _positive(self.max_chunks, "--max-chunks", optional=True)
        if min(self.poll_s, self.max_wait_s) < 0:
            raise MemlmError(f"--poll-s and --max-wait-s must be >= 0, got {self.poll_s} and {self.max_wait_s}")


@dataclass(frozen=True)
class EvalRun:
    """`memlm eval`: perplexity of `model` on `text_file` with a bounded context, through the
    paged engine with the cache and weight settings generation uses (`entrypoints/evaluate.py`)."""
    model: str
    text_file: str
    context: int = CONTEXT
    stride: int | None = None             # window step (None: = context)
    max_tokens: int | None = None         # score only the first N tokens
    chunk: int = EVAL_CHUNK               # prefill tokens per engine step
    kv_dtype: str = "auto"                # the engine's KV codec (memlm.dtypes names)
    weight_dtype: str = "auto"
    memory_budget: str | None = None
    json: bool = False                    # print one JSON object instead of a sentence
    kv_policy: dict = field(default_factory=dict)   # SamplingParams kv_* fields (kv/policies.py)

    def __post_init__(self):
        _positive(self.context, "--context")
        if self.stride is not None and not 0 < self.stride <= self.context:
            raise MemlmError(f"--stride must be in 1..context ({self.context}), got {self.stride}")
        _positive(self.max_tokens, "--max-tokens", optional=True)
        _positive(self.chunk, "--chunk")


def load(name: str):
    """A model by preset name, .gguf file or directory (`memlm.loading.load_model`)."""
    from memlm.loading import load_model        # imported late: loading pulls in gguf etc.
    return load_model(name)


def finish(trainer, run: LoopRun, tokenizer, label: str) -> None:
    """Print a finished run's summary, and export the HF copy `run.export_hf` asks for (on the
    main rank only in a data-parallel run)."""
    from memlm.training import checkpoint
    if not trainer.is_main:
        return
    r = trainer.result
    val = r.final_val_loss
    print(f"{label}: {r.steps} steps, {r.tokens} tokens, {r.wall_s:.0f} s; "
          f"validation loss {val:.4f} (perplexity {math.exp(min(val, 50)):.2f})")
    if run.out:
        print(f"saved {run.out} (run it: memlm generate --model {run.out})")
    if run.export_hf:
        checkpoint.export_hf(trainer.model, run.export_hf, tokenizer)
        print(f"exported a transformers copy to {run.export_hf}")
