"""One tokenizer interface over the `tokenizers` library, the chat template, and streaming
detokenization.

Owns: `Tokenizer` (encode/decode, special ids, chat template rendering) built either from a
GGUF file's `tokenizer.ggml.*` metadata or from a Hugging Face directory (tokenizer.json +
tokenizer_config.json + generation_config.json), and `IncrementalDetokenizer`, which turns a
stream of token ids into text without ever emitting half a UTF-8 character.
Does not know: model weights, how GGUF files are parsed (the GGUF loader hands it plain
Python values), or sampling.
"""
from __future__ import annotations

import functools
import json
import warnings
from datetime import datetime
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from memlm.errors import MemlmError, ModelLoadError, UnsupportedModelError

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# Split regexes for `tokenizer.ggml.pre` values; each is the pattern the vocabulary's merges were
# learned with (the same facts llama.cpp's `llama-vocab.cpp` encodes).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    # pre name -> (split regex or None for GPT-2's built-in one, split digits one by one first)
    "gpt2": (None, False), "default": (None, False), "mpt": (None, False), "olmo": (None, False),
    "smollm": (None, True), "starcoder": (None, True), "refact": (None, True),
    "codeshell": (None, True),
    "llama-bpe": (_LLAMA3_SPLIT, False), "llama3": (_LLAMA3_SPLIT, False),
    "llama-v3": (_LLAMA3_SPLIT, False), "smaug-bpe": (_LLAMA3_SPLIT, False),
    "falcon3": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False), "deepseek-r1-qwen": (_QWEN2_SPLIT, False),
}
# End-of-turn markers: when one is in the vocabulary and the chat template emits it, generation
# must stop on it even if the file's eos id is a different token.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _byte_level_pre_tokenizer(pre: str):
    """The pre-tokenizer llama.cpp uses for a GGUF `tokenizer.ggml.pre` value."""
    if pre not in _PRE_SPLITS:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown to memlm; using GPT-2's split, "
                      "so some texts may tokenize differently than in llama.cpp")
    split, digits = _PRE_SPLITS.get(pre, (None, False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and special ids."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: tuple[int, ...] = (), add_bos_token: bool = False,
                 chat_template: str | None = None):
        self._tk = backend
        self.bos_token_id = bos_token_id
        self.add_bos_token = bool(add_bos_token and bos_token_id is not None)
        self.chat_template = chat_template
        eos = list(dict.fromkeys(int(t) for t in eos_token_ids))
        for tok in _END_OF_TURN:   # add end-of-turn tokens the template actually emits
            tid = backend.token_to_id(tok)
            if tid is not None and chat_template and tok in chat_template and tid not in eos:
                eos.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)

    # ---- basic interface -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. "<|im_start|>") map to their ids.

        Args:
            add_special_tokens: prepend BOS when the model asks for one (`add_bos_token`).
        """
        ids = self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def to_json(self) -> str:
        """The `tokenizers` JSON of this tokenizer (what grammar engines build their view from)."""
        return self._tk.to_str()

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.id_to_token(token_id) or "")

    # ---- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's jinja template.

        Raises:
            MemlmError: the model ships no chat template, or the template rejects the messages.
        """
        if not self.chat_template:
            raise MemlmError("this model has no chat template: send a plain prompt instead "
                             "(e.g. `memlm generate` without --chat)")
        import jinja2

        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_token_id), eos_token=self._token_text(eos), **extra)
        except jinja2.exceptions.TemplateError as e:
            raise MemlmError(f"chat template failed: {e}; check the roles/order of the messages") from e

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        """Rebuild a byte-level BPE tokenizer from GGUF metadata.

        Args:
            meta: GGUF key -> Python value for the `tokenizer.*` keys (tokens, merges,
                token_type, pre, bos/eos/eot/eom ids, add_bos_token, chat_template).
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE "
                                 "'gpt2'): use a model with a GPT-2/Llama-3 style tokenizer")
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        if not tokens or not merges:
            raise ModelLoadError("GGUF file has no tokenizer vocabulary or merges: re-convert it with "
                                 "llama.cpp's convert_hf_to_gguf.py")
        pre = meta.get("tokenizer.ggml.pre", "default")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3"))
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        specials = [AddedToken(t, special=True, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED]
        backend.add_special_tokens(specials)
        if user:
            backend.add_tokens(user)
        eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return cls(backend, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=tuple(int(t) for t in eos if t is not None),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja,
        generation_config.json when present) from a Hugging Face style directory."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json: save the tokenizer there "
                                 "(e.g. `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            cfg = _read_json(path / "tokenizer_config.json")
            gen = _read_json(path / "generation_config.json")
        except Exception as e:  # tokenizers raises plain Exception
            raise ModelLoadError(f"cannot read the tokenizer in {path}: {e}; re-save it with "
                                 "transformers or tokenizers") from e
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")

        def token_id(entry):
            if isinstance(entry, dict):
                entry = entry.get("content")
            return backend.token_to_id(entry) if isinstance(entry, str) else None

        bos = token_id(cfg.get("bos_token"))
        eos = [token_id(cfg.get("eos_token"))]
        gen_eos = gen.get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = gen["bos_token_id"]
        return cls(backend, bos_token_id=bos, eos_token_ids=tuple(e for e in eos if e is not None),
                   add_bos_token=bool(cfg.get("add_bos_token", False)), chat_template=template)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    """Compile a chat template in a sandbox with the helpers HF templates expect."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


class IncrementalDetokenizer:
    """Turns generated token ids into text one token at a time.

    Byte-level BPE can split one character over several tokens (e.g. "🙂" is 4 bytes). We decode
    a short window of recent ids and hold text back while it ends in U+FFFD (an incomplete
    character); once the character completes, the whole of it is emitted.

        ids:  ... prompt ... | emitted ............ | pending (not yet emitted)
                   prefix_offset ^       read_offset ^                len(ids) ^
    """

    _MAX_PENDING = 4   # a UTF-8 character has at most 4 bytes, so at most 4 tokens

    def __init__(self, tokenizer: Tokenizer, prompt_ids=None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in (prompt_ids or [])][-6:]   # context for spacing
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far (generated tokens only, not the prompt)."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one token id; return the text it completes ("" while a character is pending)."""
        self._ids.append(int(token_id))
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        prefix = decode(self._ids[self._prefix_offset:self._read_offset])
        full = decode(self._ids[self._prefix_offset:])
        pending = len(self._ids) - self._read_offset
        if full.endswith("\ufffd") and pending < self._MAX_PENDING:
            return ""
        delta = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        # keep the window short so each add() costs O(1) decodes of a few ids
        if self._prefix_offset > 64:
            cut = self._prefix_offset
            self._ids = self._ids[cut:]
            self._prefix_offset, self._read_offset = 0, self._read_offset - cut
        self._text += delta
        return delta
