"""Offline batch generation shared by `memlm generate --prompts-file` and its Ray Data actors
(`memlm.distributed.ray_data`): one call that runs a list of prompts through an `LLM`, and the
JSONL row written for each result.

Owns: how a batch's prompts reach the engine (text prompts as they are, message lists through
the chat template; `chat=True` wraps text prompts as one user message and uses `LLM.chat`) and
the row format (prompt, text, token_ids, finish_reason; outputs when n > 1; error when failed).
Does not know: files, flags, or where the batch runs.
"""
from __future__ import annotations


def run_prompts(llm, prompts: list, params: list, chat: bool, use_tqdm: bool = True) -> list:
    """RequestOutputs of `prompts` (str, or chat message lists) under their `params`, in order."""
    if chat:
        return llm.chat([p if isinstance(p, list) else [{"role": "user", "content": p}]
                         for p in prompts], params, use_tqdm=use_tqdm)
    return llm.generate([p if isinstance(p, str) else llm.tokenizer.apply_chat_template(p)
                         for p in prompts], params, use_tqdm=use_tqdm)


def output_row(prompt, output) -> dict:
    """The JSONL row of one request's output."""
    first = output.outputs[0]
    row = {"prompt": prompt, "text": first.text, "token_ids": list(first.token_ids),
           "finish_reason": first.finish_reason}
    if len(output.outputs) > 1:
        row["outputs"] = [{"text": c.text, "token_ids": list(c.token_ids),
                           "finish_reason": c.finish_reason} for c in output.outputs]
    if output.error:
        row["error"] = output.error
    return row
