"""Front ends over an engine: `LLM` (sync, `llm.py`), `AsyncLLM` (`async_llm.py`), the input and
output processing they share (`processing.py`), and the command line (`cli/`).

Owns: nothing itself; import the modules (the public names are re-exported lazily by `memlm`).
"""
