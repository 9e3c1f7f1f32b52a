"""Building and loading memlm's small C kernels (CPU only).

Owns: compiling a kernel source from `csrc/` once per machine (lazily, through `Library`) with
the system C compiler into `~/.cache/memlm/kernels` (`$XDG_CACHE_HOME/memlm/kernels` where set),
keyed by the source and the headers beside it, the compiler and its flags, and the CPU's feature
flags (`cpu.cpu_flags`); loading it with ctypes; and the one switch that turns every native
kernel off (`MEMLM_NATIVE=0`).
Does not know: what the kernels compute; `attention.py` and `fused_ops.py` own their
signatures and the pure-torch fallbacks used when `Library.lib` is None.

The compiler reads the real files under `csrc/` (its messages name them, with line numbers);
a failed build leaves the kernels off and keeps the compiler's output in `Library.error`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from memlm.kernels.cpu import cpu_flags

CSRC = Path(__file__).with_name("csrc")   # the C sources, shipped as package data
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
BUILD_TIMEOUT_S = 120


class BuildError(RuntimeError):
    """The C compiler rejected a kernel source; the message is the compiler's output."""


def enabled() -> bool:
    return os.environ.get("MEMLM_NATIVE", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "memlm" / "kernels"


def compiler() -> str:
    return os.environ.get("CC", "cc")


def build_key(source: Path) -> str:
    """Hash of everything the built library depends on: editing a .c or .h rebuilds it."""
    h = hashlib.sha256()
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join([compiler(), *FLAGS, *sorted(cpu_flags())]).encode())
    return h.hexdigest()[:16]


def build(source: Path, target: Path) -> None:
    """Compile `source` into the shared library `target`; raises `BuildError` on compiler errors.

    The library is written beside the cache and renamed into place, so concurrent builders
    never load half a file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / "out.so"
        done = subprocess.run([compiler(), *FLAGS, str(source), "-o", str(built), "-lm"],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise BuildError(done.stderr.strip() or f"{compiler()} exited with {done.returncode}")
        os.replace(built, target)


class Library:
    """One kernel library, built and loaded on first use; `lib` is None where it cannot be.

    Args:
        name: the library's name (`lib<name>` in the cache).
        source: its C file; a relative path is taken under `csrc/`.
        signatures: each exported function -> its ctypes argument types (all return void).
    """

    def __init__(self, name: str, source: str | Path, signatures: dict[str, list]):
        self.name, self.source, self.signatures = name, CSRC / source, signatures
        self.error: str | None = None    # why the last build or load failed, if it did
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    @property
    def lib(self) -> ctypes.CDLL | None:
        if not self._tried:
            self._tried = True
            self._lib = self._load() if enabled() else None
        return self._lib

    def target(self) -> Path:
        """Where the built library is cached."""
        return cache_dir() / f"{self.name}_{build_key(self.source)}.so"

    def _load(self) -> ctypes.CDLL | None:
        try:
            target = self.target()
            if not target.exists():
                build(self.source, target)
            lib = ctypes.CDLL(str(target))
            for fn_name, argtypes in self.signatures.items():
                fn = getattr(lib, fn_name)
                fn.restype, fn.argtypes = None, argtypes
        except (BuildError, OSError, AttributeError, subprocess.SubprocessError) as e:
            self.error = str(e)
            return None
        return lib
