"""Sampling parameters and the batched sampler.

Owns: `SamplingParams` (what a user may ask for one request, validated on construction; a bad
field raises `SamplingParamsError` naming it) and `Sampler` (logits rows -> next tokens, each
row with its own parameters, its own `torch.Generator`, so a seeded request samples the same
tokens alone or inside any batch, and its grammar mask when it asks for structured output).
Does not know: scheduling, KV memory or text; stop strings are matched by the output
processor, not here.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from memlm.kernels import fused_ops
from memlm.kv.policies import POLICIES
from memlm.structured import GrammarState, StructuredOutput


class SamplingParamsError(ValueError):
    """A SamplingParams field is out of range; `param` names it (the HTTP server's 400s do)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick tokens for one request (vLLM-shaped).

    temperature 0 means greedy. top_k 0 or -1 means off. `logprobs=N` returns the sampled
    token's log-probability plus the top N; `prompt_logprobs=N` does the same per prompt token.
    `structured_output=StructuredOutput(json_schema=...)` masks every token the JSON grammar
    does not allow (`memlm.structured`); logprobs stay the model's, before the mask.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None   # JSON (schema) as token masks
    kv_policy: str | None = None         # KV eviction (memlm.kv.policies); None: the engine's default
    kv_window: int | None = None         # recent tokens kept (None: the engine's / policy's default)
    kv_sinks: int | None = None          # first tokens always kept
    kv_budget: int | None = None         # most cached tokens (h2o, snap)
    truncate_prompt_tokens: int | None = None   # keep only the prompt's last N tokens

    def __post_init__(self) -> None:
        def bad(param: str, msg: str):
            raise SamplingParamsError(param, f"invalid SamplingParams: {param} {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", f"must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0 or v > 20):
                bad(name, f"must be an integer in [0, 20] or None, got {v!r}")
        if self.kv_policy is not None and self.kv_policy not in POLICIES:
            bad("kv_policy", f"must be one of {', '.join(POLICIES)}, got {self.kv_policy!r}")
        for name in ("kv_window", "kv_sinks", "kv_budget", "truncate_prompt_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (0 if name == "kv_sinks" else 1)):
                bad(name, f"must be a{' non-negative' if name == 'kv_sinks' else ' positive'} integer "
                    f"or None, got {v!r}")
        if self.kv_policy not in (None, "full") and self.n != 1:
            bad("n", f"must be 1 with kv_policy={self.kv_policy} (completions cannot share an evicting cache)")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            bad("structured_output", f"must be a memlm.structured.StructuredOutput, got "
                f"{type(self.structured_output).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def needs_sort(self) -> bool:
        """True when top-k or top-p truncation must sort the distribution."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator per sequence: seeded ones repeat exactly; others draw a fresh seed."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g


@dataclass
class SampleRow:
    """One row of a sampling batch: the parameters, history and generator of one sequence."""

    params: SamplingParams
    generator: torch.Generator
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    grammar: GrammarState | None = None        # structured output: only its tokens may follow


@dataclass
class SamplerOutput:
    """What the sampler returns for a batch of B rows."""

    token_ids: list[int]                                # (B,) sampled tokens
    logprobs: list[dict[int, float] | None]             # per row: {token: logprob} or None


class Sampler:
    """Turn a batch of logits rows into next tokens, each row under its own parameters.

    Rows are processed in chunks of `chunk_rows` so the (rows, vocab) temporaries of sorting,
    softmax and logprobs stay small whatever the batch size.
    """

    def __init__(self, chunk_rows: int = 16):
        self.chunk_rows = chunk_rows

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        """Args: logits (B, V), one row per entry of `rows`. Returns a SamplerOutput."""
        out = SamplerOutput([], [])
        for a in range(0, len(rows), self.chunk_rows):
            part = self._sample(logits[a:a + self.chunk_rows], rows[a:a + self.chunk_rows])
            out.token_ids += part.token_ids
            out.logprobs += part.logprobs
        return out

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        B = logits.shape[0]
        logits = logits.float()
        want_logprobs = [r.params.logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None  # (B, V)

        constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
        if constrained or any(r.params.uses_penalties for r in rows):
            logits = logits.clone()
            for i, r in enumerate(rows):
                if r.params.uses_penalties:
                    apply_penalties(logits[i], r)
            for i in constrained:   # after penalties, before greedy / sampling; logprobs stay the model's
                logits[i].masked_fill_(~rows[i].grammar.allowed(logits.shape[-1], logits.device),
                                       float("-inf"))

        tokens = fused_ops.row_argmax(logits)  # (B,) greedy for every row; overwritten below if sampling
        sample_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sample_idx:
            idx = torch.tensor(sample_idx, device=logits.device)
            probs = self._probs(logits[idx], [rows[i].params for i in sample_idx])  # (S, V)
            for j, i in enumerate(sample_idx):
                tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]

        token_list = tokens.tolist()
        out_lp: list[dict[int, float] | None] = [None] * B
        if raw_logprobs is not None:
            for i, r in enumerate(rows):
                if want_logprobs[i]:
                    out_lp[i] = top_logprobs(raw_logprobs[i], token_list[i], r.params.logprobs)
        return SamplerOutput(token_list, out_lp)

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """(S, V) logits of sampled rows -> (S, V) probabilities after temperature/top-k/p/min-p."""
        dev = logits.device
        temp = torch.tensor([p.temperature for p in params], device=dev)[:, None]
        logits = logits / temp
        if any(p.needs_sort for p in params):
            V = logits.shape[-1]
            top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=dev)
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (S, V)
            ranks = torch.arange(V, device=dev)[None, :]
            drop = ranks >= top_k[:, None]
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop |= mass_before >= top_p[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            thresh = torch.tensor(min_p, device=dev)[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < thresh, 0.0)
        return probs


def apply_penalties(row: torch.Tensor, r: SampleRow) -> None:
    """In place on one (V,) logits row.

    repetition (HF/CTRL style) over prompt + output; presence/frequency (OpenAI style) over
    the output only.
    """
    p = r.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(r.output_token_ids)),
                            dtype=torch.long, device=row.device)
        if seen.numel():
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if r.output_token_ids and (p.presence_penalty or p.frequency_penalty):
        ids = torch.tensor(r.output_token_ids, dtype=torch.long, device=row.device)
        counts = torch.zeros_like(row).scatter_add_(0, ids, torch.ones_like(ids, dtype=row.dtype))
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def top_logprobs(logprobs: torch.Tensor, chosen: int, n: int) -> dict[int, float]:
    """(V,) log-probabilities -> {chosen: lp, and the top n tokens: lp}."""
    out = {int(chosen): float(logprobs[chosen])}
    if n:
        vals, ids = logprobs.topk(n)
        for t, v in zip(ids.tolist(), vals.tolist()):
            out.setdefault(t, v)
    return out
