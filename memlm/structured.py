"""Structured output: JSON (matching a schema, or any object) enforced as token masks, via
llguidance (a Rust grammar engine; no torch of its own).

Owns: `StructuredOutput` (what a request asks for, as `SamplingParams.structured_output`),
compiling it to an llguidance grammar, one llguidance tokenizer per memlm tokenizer (built
once from its `tokenizers` JSON), and `GrammarState`: one per sequence, giving the mask of
tokens the grammar allows next and consuming each token the engine appends. A sequence whose
grammar is complete finishes with "stop".
Does not know: batching (the sampler applies the masks), scheduling or HTTP. Preemption needs
nothing here: a preempted sequence keeps its tokens, so its grammar state stays valid.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from memlm.errors import RequestError

# Compact JSON: no free-form whitespace, so a model cannot pad an answer out to max_tokens.
GRAMMAR_DEFAULTS = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise RequestError("structured output needs llguidance: pip install llguidance "
                           "(it comes with memlm[serve])") from e
    return llguidance


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain a completion to JSON: `json_schema` (a JSON Schema dict), or any JSON object
    when it is None (OpenAI's response_format json_object)."""

    json_schema: dict | None = None

    def __post_init__(self):
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"structured_output json_schema must be a dict (a JSON Schema), "
                             f"got {type(self.json_schema).__name__}")

    def grammar(self) -> str:
        schema = self.json_schema if self.json_schema is not None else {"type": "object"}
        try:
            return _llguidance().LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                     defaults=GRAMMAR_DEFAULTS)
        except (ValueError, RuntimeError, TypeError) as e:
            raise RequestError(f"invalid JSON schema for structured output: {e}") from None


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer):
    """llguidance's view of a memlm Tokenizer (from its `tokenizers` JSON); cached per tokenizer."""
    eos = list(tokenizer.eos_token_ids)
    return _llguidance().LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                                     eos_token=eos[0] if eos else None)


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, spec: StructuredOutput, tokenizer):
        ll = _llguidance()
        self._matcher = ll.LLMatcher(_ll_tokenizer(tokenizer), spec.grammar())
        if self._matcher.is_error():
            raise RequestError(f"invalid JSON schema for structured output: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return self._matcher.is_stopped()

    def allowed(self, vocab: int, device) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next (ids past the tokenizer's: never)."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        bits = (words[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1      # little-endian bits
        mask = bits.flatten().bool()
        if mask.numel() < vocab:
            mask = torch.cat([mask, mask.new_zeros(vocab - mask.numel())])
        return mask[:vocab].to(device)

    def consume(self, token_id: int) -> str | None:
        """Advance by one sampled token. Returns None while the grammar goes on, "stop" once it
        is complete, or an error message when the token breaks it (only a token sampled
        without this state's mask can); the caller finishes the sequence on either."""
        if not self._matcher.consume_token(int(token_id)):
            return (f"token {token_id} does not fit the structured output grammar: "
                    f"{self._matcher.get_error()}")
        return "stop" if self._matcher.is_stopped() else None
