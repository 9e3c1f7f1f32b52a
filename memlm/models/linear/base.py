"""The linear-method interface and the two modules that hold weights through it.

Owns: `LinearMethod` (how one weight format creates, post-processes and applies a projection,
an embedding table and the LM head), the `Linear` and `Embedding` modules every block builds,
and the table of registered methods. Does not know: any concrete format (`fp32.py`,
`bf16.py`, ... each registers itself) or which model it is in; blocks decide which projections
are fused and where the residual stream is (`memlm.models.blocks`).

A method object is made per model (it may hold per-model state, e.g. the bf16 input-cast cache)
and shared by all its layers. Life of a weight, as in vLLM's `QuantizeMethodBase`:

    build     Linear(..., method)   -> method.create_weights(layer, bias, init)   fp32 Parameters
    load      WeightSink fills layer.weight / layer.bias by name (memlm checkpoint names)
    convert   method.process_weights_after_loading(layer)   e.g. cast to bf16, prepack
    run       layer(x) -> method.apply(layer, x)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from memlm import dtypes

METHODS: dict[str, type["LinearMethod"]] = {}   # canonical weight dtype -> method class
DTYPE_NAMES = {t: n for n, t in dtypes.TORCH.items()}


def register(cls: type["LinearMethod"]) -> type["LinearMethod"]:
    """Class decorator: make `cls` the method for weights named `cls.name` (memlm.dtypes)."""
    METHODS[cls.name] = cls
    return cls


class LinearMethod:
    """One weight format. Subclasses set `name` and override what their format changes.

    Attributes:
        name: the canonical weight dtype it implements ("fp32", "bf16", ...).
        inner_dtype: dtype of activations between a projection and the next matmul inside a
            block (q/k/v heads, the MLP's inner activation); the residual stream stays fp32.
        fused_layers: decoder layers that qualify take `DecoderLayer._forward_fused` (norms,
            RoPE and SwiGLU in single bf16 passes) instead of the plain forward.
        options: keyword settings the constructor takes besides `device` (int4: group_size).
    """

    name = ""
    options: tuple[str, ...] = ()
    inner_dtype = torch.float32
    fused_layers = False

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else "cpu")

    # ---- projections -----------------------------------------------------------------------
    def create_weights(self, layer: "Linear", bias: bool, init: bool) -> None:
        """fp32 `weight` (out, in) and `bias` (out,) Parameters, as checkpoints hold them.

        init: nn.Linear's random init (same draws, same order); False leaves storage unwritten
        for a loader to fill (no resident pages until then).
        """
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features))
        layer.bias = nn.Parameter(torch.empty(layer.out_features)) if bias else None
        if init:
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
            if layer.bias is not None:
                bound = 1 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0
                nn.init.uniform_(layer.bias, -bound, bound)

    def process_weights_after_loading(self, layer: "Linear") -> None:
        """Turn the loaded fp32 weights into this format (in place). Default: keep them."""

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        raise NotImplementedError

    def fuse(self, layers: list["Linear"]) -> "Linear | None":
        """One projection computing `layers` (same input) with outputs concatenated, output in
        `inner_dtype`; None keeps them apart (the default). The parts are the caller's to drop."""
        return None

    def set_out_dtype(self, layer: "Linear", dtype: torch.dtype) -> None:
        """Have `layer` return `dtype` (a fused layer adds it into the fp32 stream itself)."""

    def fuse_activation(self, layer: "Linear", activation: str) -> bool:
        """Run `activation` inside `layer`'s matmul if the format can; True when it does."""
        return False

    # ---- embeddings and the LM head --------------------------------------------------------
    def create_embedding(self, emb: "Embedding", init: bool) -> None:
        emb.weight = nn.Parameter(torch.empty(emb.num_embeddings, emb.embedding_dim))
        if init:
            nn.init.normal_(emb.weight)                  # nn.Embedding's init

    def process_embedding(self, emb: "Embedding") -> None:
        """Convert a loaded table (in place). Default: keep it."""

    def embed(self, emb: "Embedding", ids: torch.Tensor) -> torch.Tensor:
        """(...) ids -> (..., dim) fp32 rows."""
        raise NotImplementedError

    def process_lm_head(self, head: "Linear | Embedding") -> None:
        """Prepare the LM head after loading: an untied `Linear`, or the tied `Embedding` whose
        table is the head (processed as an embedding already)."""
        if isinstance(head, Linear):
            self.process_weights_after_loading(head)

    def logits(self, head: "Linear | Embedding", hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, vocab) logits through the LM head (no bias: memlm heads have none)."""
        raise NotImplementedError

    # ---- the model as a whole --------------------------------------------------------------
    def process_model(self, model: nn.Module) -> None:
        """Last step of a conversion, after every layer and the head. Default: nothing."""

    def warm_up(self, model: nn.Module, max_rows: int, head_rows: int | None = None) -> None:
        """Create any per-shape state the format keeps (resident), for row counts 1..max_rows
        (the LM head: 1..head_rows, default max_rows; it only sees the rows that sample)."""

    def bytes_by_codec(self, model: nn.Module) -> dict[str, int]:
        """Bytes of weights as held (`Transformer.weight_bytes`), by codec ("int4 g32", "int8",
        "fp32", "bf16 prepacked", ...), for `memlm info`."""
        out: dict[str, int] = {}
        seen: set[int] = set()
        for mod in model.modules():
            for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                if t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                label = self.codec_label(mod, name, t)
                out[label] = out.get(label, 0) + t.numel() * t.element_size()
        outside = self.held_outside_parameters(model)[1]
        if outside:
            out[f"{self.name} prepacked"] = out.get(f"{self.name} prepacked", 0) + outside
        return out

    def codec_label(self, module: nn.Module, name: str, tensor: torch.Tensor) -> str:
        """The codec a tensor of `module` belongs to; default: its dtype's name."""
        return DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype).replace("torch.", ""))

    def stored_bytes(self, shape: tuple[int, ...], table: bool, codec: str | None = None) -> int:
        """Bytes this format holds for a checkpoint tensor of `shape` (out, in) once loaded;
        table: an embedding or LM head; codec: the GGUF block codec it is stored in, if any
        ("q4_1", ...). Default: fp32. Sizes a load before it starts."""
        return math.prod(shape) * 4

    def keeps_blocks(self, codec: str, table: bool) -> bool:
        """True when this format holds a GGUF tensor in ggml block `codec` ("q8_0", "q4_0",
        "q4_1"; `memlm.kernels.gemv`) as loaded: the loader then hands the bytes over as the
        module's `gguf_blocks` and never widens them to fp32. table: an embedding or LM head."""
        return False

    def held_outside_parameters(self, model: nn.Module) -> tuple[int, int]:
        """(elements, bytes) of weights the format holds in tensors that are not Parameters or
        buffers (e.g. prepacked copies); counted by `Transformer.num_parameters / weight_bytes`."""
        return 0, 0


class Linear(nn.Module):
    """y = x W^T + b, computed by its `method`. Parameter names are nn.Linear's (`weight`,
    `bias`), so checkpoints and state_dict keys are those of an nn.Linear. A method may keep
    more per-layer state on the layer after `process_weights_after_loading` (bf16: `packed`,
    `out_dtype`, `post_op`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: LinearMethod,
                 init: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method
        method.create_weights(self, bias, init)

    def process(self, method: LinearMethod) -> None:
        """Adopt `method` and let it convert the loaded weights."""
        self.method = method
        method.process_weights_after_loading(self)

    def set_out_dtype(self, dtype: torch.dtype) -> None:
        self.method.set_out_dtype(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.method.name}")


class Embedding(nn.Module):
    """A lookup table (`weight`, (num, dim), nn.Embedding's name) read through its `method`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, method: LinearMethod,
                 init: bool = True):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.method = method
        method.create_embedding(self, init)

    def process(self, method: LinearMethod) -> None:
        self.method = method
        method.process_embedding(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.method.embed(self, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.method.name}"

