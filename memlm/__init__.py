"""memlm: run GPT-style language models inside one memory budget.

    from memlm import LLM, SamplingParams
    llm = LLM(memory_budget="2GiB")
    print(llm.generate("Hello", SamplingParams(max_tokens=20))[0].outputs[0].text)
"""
# Names resolve lazily so `import memlm.memory.block_pool` (or the CLI's --help) stays free of
# torch and the engine.
_EXPORTS = {
    "LLM": "memlm.llm",
    "SamplingParams": "memlm.sampling",
    "RequestOutput": "memlm.outputs",
    "CompletionOutput": "memlm.outputs",
    "StreamChunk": "memlm.outputs",
    "EngineConfig": "memlm.engine.llm_engine",
    "AsyncLLM": "memlm.engine.async_engine",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memlm' has no attribute {name!r}")
