"""Training side of memlm: corpora and token files (`data`), LR schedules and the adaptive
controller (`schedules`), distillation losses (`distill`) and the teacher logit cache
(`teacher_cache`), the loop and checkpoints (`trainer`, `checkpoint`), students composed from a
spec and the `--fit` search (`students`), online learning (`online`), perplexity (`evaluate`),
and the runs of the `train` / `distill` / `eval` commands: typed run configs and the steps they
share (`runs`), and the pipelines that take them (`train_run`, `distill_run`). The command-line
surface itself is `memlm.entrypoints.cli.train`; nothing here imports `memlm.entrypoints`.

Names resolve lazily, so `import memlm.training` alone loads no submodule.
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
    "DistillRun": "runs", "EvalRun": "runs", "OnlineRun": "runs", "TrainRun": "runs",
    "run_online": "train_run", "run_train": "train_run", "run_distill": "distill_run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"memlm.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'memlm.training' has no attribute {name!r}")
