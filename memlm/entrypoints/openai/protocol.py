"""Request bodies of the OpenAI-compatible API, as pydantic models (plus vLLM's extras).

Owns: which fields each endpoint accepts, their JSON types, and mapping the sampling fields onto
`SamplingParams` (whose own validation decides the ranges: each default and limit is defined
once, in `memlm.sampling`). Fields that clients send but memlm does not implement are accepted
only at their no-op value, else refused with a 400 naming them; unknown fields are ignored,
as OpenAI does.
Does not know: the engine, HTTP or how responses are built.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from memlm.entrypoints.openai.errors import bad_request
from memlm.sampling import SamplingParams, SamplingParamsError
from memlm.structured import StructuredOutput

# SamplingParams fields a request may set under the same name.
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
                    "ignore_eos", "include_stop_str_in_output", "truncate_prompt_tokens",
                    "kv_policy", "kv_window", "kv_sinks", "kv_budget")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's extra: keep only the prompt's last N tokens. memlm's extras (issue 14): the KV
    # policy of this request (`memlm.kv.policies`; None: the server's --kv-policy defaults).
    truncate_prompt_tokens: int | None = None
    kv_policy: str | None = None
    kv_window: int | None = None
    kv_sinks: int | None = None
    kv_budget: int | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported(self) -> dict[str, Any]:
        """Fields given at a value memlm does not implement -> {name: value}."""
        out = {"logit_bias": self.logit_bias} if self.logit_bias else {}
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            out["response_format"] = kind
        return out

    def structured_output(self) -> StructuredOutput | None:
        """response_format json_object / json_schema as memlm's StructuredOutput (text: None)."""
        fmt = self.response_format or {}
        if fmt.get("type") == "json_object":
            return StructuredOutput()
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema must be a JSON Schema object",
                                  "response_format")
            return StructuredOutput(json_schema=schema)
        return None

    def sampling_params(self, renames: dict[str, str] | None = None, **fields) -> SamplingParams:
        """SamplingParams from the request's sampling fields plus `fields` (None = the default).

        Raises:
            APIError: 400 naming the request's field (`renames` maps SamplingParams names back
                to the request's, e.g. logprobs -> top_logprobs) or a field memlm lacks.
        """
        for name, value in self.unsupported().items():
            raise bad_request(f"{name}={value!r} is not supported by memlm; drop it", name)
        given = {k: getattr(self, k) for k in _SAMPLING_FIELDS if getattr(self, k) is not None}
        given.update({k: v for k, v in fields.items() if v is not None})
        try:
            return SamplingParams(**given)
        except SamplingParamsError as e:
            param = (renames or {}).get(e.param, e.param)
            raise bad_request(str(e).replace(f" {e.param} ", f" {param} ", 1), param) from None
        except (TypeError, ValueError) as e:
            raise bad_request(str(e)) from None


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt`: a string, strings, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        if self.best_of not in (None, self.n):
            out["best_of"] = self.best_of
        if self.suffix:
            out["suffix"] = self.suffix
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, str]:
        """{"role", "content"} for the chat template; content parts of type text are joined."""
        content = self.content
        if isinstance(content, list):
            parts = []
            for i, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"content part {i} of type {part.get('type')!r} is not "
                                      "supported: memlm reads text parts only", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    session_id: str | None = None      # memlm extension: keep this conversation's KV for its next turn

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        if self.tools:
            out["tools"] = f"{len(self.tools)} tools"
        return out

    def conversation(self) -> list[dict[str, str]]:
        return [m.template_dict() for m in self.messages]


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or messages rendered through the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]

