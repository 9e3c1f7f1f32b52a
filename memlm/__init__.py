"""memlm: run GPT-style language models inside one memory budget.

    from memlm import LLM, SamplingParams
    llm = LLM(memory_budget="2GiB")
    print(llm.generate("Hello", SamplingParams(max_tokens=20))[0].outputs[0].text)
"""
# Names resolve lazily so `import memlm.kv.block_pool` stays free of torch and the engine.
_EXPORTS = {
    "LLM": "memlm.entrypoints.llm",
    "SamplingParams": "memlm.sampling",
    "StructuredOutput": "memlm.structured",
    "RequestOutput": "memlm.outputs",
    "CompletionOutput": "memlm.outputs",
    "StreamChunk": "memlm.outputs",
    "EngineConfig": "memlm.engine.config",
    "AsyncLLM": "memlm.entrypoints.async_llm",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memlm' has no attribute {name!r}")
