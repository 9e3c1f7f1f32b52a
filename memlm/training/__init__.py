"""Training side of memlm: corpora and token files (`data`), LR schedules and the adaptive
controller (`schedules`), distillation losses (`distill`) and the teacher logit cache
(`teacher_cache`), the loop and checkpoints (`trainer`, `checkpoint`), students composed from a
spec and the `--fit` search (`students`), online learning (`online`), perplexity (`evaluate`),
and the `train` / `distill` / `eval` commands (`cli`, `distill_run`).

Names resolve lazily so registering the CLI commands does not import torch.
"""
_EXPORTS = {
    "export_hf": "checkpoint", "save_model": "checkpoint",
    "TextTokenizer": "data", "WindowSampler": "data", "load_corpus": "data", "prepare_tokens": "data",
    "split_documents": "data",
    "DistillConfig": "distill", "DistillObjective": "distill", "ce_loss": "distill",
    "hidden_cosine_loss": "distill", "kl_loss": "distill",
    "TeacherCache": "teacher_cache",
    "perplexity": "evaluate",
    "PlateauController": "schedules", "constant": "schedules", "cosine": "schedules",
    "make_schedule": "schedules", "wsd": "schedules",
    "STUDENT_PRESETS": "students", "fit_student": "students", "parse_student": "students",
    "OnlineConfig": "online", "OnlineLearner": "online",
    "TrainConfig": "trainer", "Trainer": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"memlm.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'memlm.training' has no attribute {name!r}")
