"""What every loader returns, and the tensor-by-tensor copy that keeps loading memory flat.

Owns: `LoadedModel` and `WeightSink`, which builds a `Transformer` with uninitialised storage
(`init_weights=False`: no random init, no second copy of the weights, no meta device) and fills
it one named tensor at a time, checking shapes and that nothing was left unfilled; given a
linear method, it converts each part (a decoder layer, an embedding) as soon as it is filled.
Does not know: file formats or name mappings (`gguf.py`, `hf.py` translate names to memlm's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memlm.config import ModelConfig
from memlm.errors import ModelLoadError
from memlm.loading.tokenizer import Tokenizer
from memlm.models.transformer import Transformer


@dataclass
class LoadedModel:
    config: ModelConfig
    model: Transformer          # eval mode, requires_grad False
    tokenizer: Tokenizer
    source: str                 # the file or directory the weights came from
    format: str                 # "gguf" | "hf" | "memlm"
    weight_bytes: int           # bytes of parameters as held in memory


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Dequantizing allocates many few-MB numpy temporaries; glibc keeps freed ones in its heap, which
    left ~90 MB of dead RSS after loading SmolLM2. Trimming as we go keeps the peak near the weights.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
TABLE_PARTS = ("embed", "pos_embed", "lm_head")     # lookup tables / the LM head, by memlm name


class WeightSink:
    """A model whose parameters are filled in one tensor at a time.

    The model is built without random init, so its fp32 storage is allocated but never written
    (not resident), then every parameter gets uninitialised storage of the final dtype and
    device; peak memory while loading is the final weights plus the one tensor being converted.
    (Building on the `meta` device does the same but imports torch's meta-tensor machinery,
    sympy included: +80 MB of resident memory for the life of the process.)

    method: a linear method (int8, int4, ...) to convert each part (`Transformer.weight_parts`)
    to as soon as all its tensors are in, its fp32 storage freed: the peak is then the
    converted model plus one part in fp32, not the whole fp32 model. None: keep fp32.
    """

    def __init__(self, cfg: ModelConfig, *, device="cpu", dtype=torch.float32, source: str = "",
                 method=None):
        self.source = source
        model = Transformer(cfg, init_weights=False)
        for p in model.parameters():
            p.data = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device)
        self.model = model
        self.params = dict(self.model.named_parameters())
        self.filled: set[str] = set()
        self.method = method
        self.pending: dict[str, set[str]] = {}          # part -> its parameters not filled yet
        if method is not None:
            for part in model.weight_parts():
                self.pending[part] = {n for n in self.params if n.startswith(part + ".")}
        self.converted: set[str] = set()

    def put(self, name: str, value: torch.Tensor) -> None:
        """Copy `value` into parameter `name` (memlm naming), converting dtype and device."""
        param = self.params.get(name)
        if param is None:
            raise ModelLoadError(f"{self.source}: tensor {name!r} has no place in the model built from "
                                 "its config; the checkpoint and its config disagree")
        if tuple(param.shape) != tuple(value.shape):
            raise ModelLoadError(f"{self.source}: tensor {name!r} has shape {tuple(value.shape)}, the config "
                                 f"implies {tuple(param.shape)}; the checkpoint and its config disagree")
        part = next((p for p, names in self.pending.items() if name in names), None)
        last = part is not None and self.pending[part] == {name}
        if last and param.dim() >= 2 and value.dtype == param.dtype and value.device == param.device:
            param.data = value           # converted at once: no fp32 staging copy (tables: ~100 MB)
        else:
            with torch.no_grad():
                param.copy_(value)
        self._filled(name, part, last)
        if value.numel() >= 1 << 18:   # big temporaries just died: give their pages back
            release_free_heap()

    def keeps_blocks(self, name: str, codec: str) -> bool:
        """True when the linear method holds weight `name` (memlm naming) in GGUF block `codec`
        as loaded (`put_blocks` then takes its bytes)."""
        return (self.method is not None and name.endswith(".weight") and name in self.params
                and self.params[name].dim() == 2
                and self.method.keeps_blocks(codec, name.split(".")[0] in TABLE_PARTS))

    def put_blocks(self, name: str, held) -> None:
        """Hand weight `name`'s GGUF blocks (`memlm.kernels.gemv.BlockWeight`) to its module as
        `gguf_blocks`; the method adopts them when the part converts (the fp32 parameter is
        never written, so never resident)."""
        param = self.params.get(name)
        shape = (held.out_features, held.in_features)
        if param is None or tuple(param.shape) != shape:
            implied = "no place" if param is None else f"shape {tuple(param.shape)}"
            raise ModelLoadError(f"{self.source}: tensor {name!r} of shape {shape} has {implied} in the "
                                 "model built from its config; the checkpoint and its config disagree")
        self.model.get_submodule(name.rpartition(".")[0]).gguf_blocks = held
        part = next((p for p, names in self.pending.items() if name in names), None)
        self._filled(name, part, part is not None and self.pending[part] == {name})

    def _filled(self, name: str, part: str | None, last: bool) -> None:
        self.filled.add(name)
        if part is not None:
            self.pending[part].discard(name)
        if last:
            self._convert(part)

    def _convert(self, part: str) -> None:
        del self.pending[part]
        with torch.no_grad():
            self.model.process_part(part, self.method)
        self.converted.add(part)
        for n in [n for n in self.params if n.startswith(part + ".")]:
            del self.params[n]                    # drop the sink's references to the fp32 tensors
        release_free_heap()   # the part's fp32 weights and its conversion's temporaries: RSS = live

    def finish(self) -> Transformer:
        """Check every parameter was filled; return the model in eval mode without gradients."""
        missing = sorted(set(self.params) - self.filled)
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ModelLoadError(f"{self.source}: checkpoint lacks tensors {missing[:3]}{more}; "
                                 "the file is incomplete or not the architecture its config names")
        self.model.eval()
        self.model.requires_grad_(False)
        if self.method is not None:
            self.model.linear_method = self.method
            with torch.no_grad():
                self.model.process_weights_after_loading(done=self.converted)
            release_free_heap()
        return self.model
