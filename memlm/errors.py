"""memlm's exceptions: every error a user can cause is one of these, with a one-line message
that names the problem and what to do. The CLI prints `error: <message>` and exits non-zero.

`MemlmError` subclasses `ValueError` so callers that validate input the usual Python way
(`except ValueError`) still catch bad arguments.
"""


class MemlmError(ValueError):
    """Base class for user-facing errors."""


class ModelLoadError(MemlmError):
    """A model file or directory cannot be read, is corrupt, or uses something unsupported."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is valid but its architecture or tensor type is not supported."""


class OutOfBudgetError(MemlmError):
    """The memory budget is too small for what was asked."""


class RequestError(MemlmError):
    """One request is invalid (empty prompt, too long for the KV pool, ...)."""
