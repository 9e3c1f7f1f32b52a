"""The decoder: embeddings, a stack of `DecoderLayer`s run in `cfg.layer_order`, final norm,
and the LM head (tied to the embeddings or not).

Owns: assembling blocks from a `ModelConfig`, the forward pass over flattened tokens, and
which linear method (`memlm.models.linear`) holds its weights: chosen when it is built, or
converted once after loading (`convert_weights`).
Does not know: paging, batching policy or sampling; it receives a `KVView` and returns hidden
states, and computes logits only for the rows the caller asks for.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from memlm.config import ModelConfig
from memlm.kernels import block_layer
from memlm.models.blocks import DecoderLayer, Rotary, make_norm
from memlm.models.kv import DenseView
from memlm.models.linear import Embedding, Linear, LinearMethod, default_method


class Transformer(nn.Module):
    """Args:
        cfg: the architecture.
        linear: the linear method of every projection, embedding and the LM head (None: fp32).
        init_weights: random init (nn.Linear / nn.Embedding's); False leaves the weights'
            storage unwritten for a loader to fill.
    """

    def __init__(self, cfg: ModelConfig, linear: LinearMethod | None = None, init_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        method, init = linear or default_method(), init_weights
        self.linear_method = method
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, method, init)
        if cfg.position == "learned":
            self.pos_embed = Embedding(cfg.max_position_embeddings, cfg.hidden_size, method, init)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, m, tuple(d for d, j in enumerate(cfg.layer_order) if j == i), method, init)
            for i, m in enumerate(cfg.mixers))
        self.final_norm = make_norm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, method, init)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta) if cfg.position == "rope" else None

    @property
    def lm_head_module(self) -> Linear | Embedding:
        """The LM head: its own `Linear`, or the embedding table when tied."""
        return self.embed if self.cfg.tie_word_embeddings else self.lm_head

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv,
                hidden_states: list | None = None) -> torch.Tensor:
        """Run all layers over N flattened tokens.

        Args:
            input_ids: (N,) token ids.
            positions: (N,) position of each token in its own sequence.
            kv: a `KVView` that knows how the N tokens split into sequences.
            hidden_states: if a list is given, the residual stream after each depth is appended.
        Returns:
            (N, hidden_size) hidden states after the final norm.
        """
        x = self.embed(input_ids)  # (N, H)
        if self.cfg.position == "learned":
            if int(positions.max()) >= self.cfg.max_position_embeddings:
                raise ValueError(f"position {int(positions.max())} is past the model's "
                                 f"{self.cfg.max_position_embeddings} learned positions")
            x = x + self.pos_embed(positions)
        rope = self.rotary.cos_sin(positions) if self.rotary is not None else None
        if hidden_states is None and x.device.type == "cpu":
            args = [self.layers[i]._layer_args for i in self.cfg.layer_order]
            direct = getattr(kv, "direct_decode", None)
            if (args and direct is not None and all(a is not None for a in args) and args[0].usable(x.shape[0])
                    and all(a.step is args[0].step for a in args)):               # a native call per layer
                out = block_layer.decode_layers(args, x, rope, direct)
                if out is not None:
                    return self.final_norm(out)
        for depth, idx in enumerate(self.cfg.layer_order):
            x = self.layers[idx](x, depth, kv, rope)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.final_norm(x)

    def per_depth_parameter_names(self) -> set[str]:
        """Parameters that act at one depth only (`cfg.depth_norms / depth_gates`), even inside a
        shared layer: the trainer does not give them a shared block's reduced learning rate."""
        return {f"layers.{i}.{n}" for i, layer in enumerate(self.layers) for n in layer.per_depth_parameter_names()}

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, vocab) fp32 logits through the LM head's linear method. Call only on
        the rows that need them."""
        head = self.lm_head_module
        return head.method.logits(head, hidden)

    def weight_parts(self) -> dict[str, nn.Module]:
        """The units a linear method converts at once, keyed by their parameters' name prefix:
        each decoder layer (its projections fuse), the embeddings, an untied LM head."""
        parts: dict[str, nn.Module] = {f"layers.{i}": layer for i, layer in enumerate(self.layers)}
        parts["embed"] = self.embed
        if self.cfg.position == "learned":
            parts["pos_embed"] = self.pos_embed
        if not self.cfg.tie_word_embeddings:
            parts["lm_head"] = self.lm_head
        return parts

    def process_part(self, name: str, method: LinearMethod) -> None:
        """Convert one loaded part (`weight_parts`) to `method`, its fp32 weights replaced."""
        part = self.weight_parts()[name]
        if name == "lm_head":
            part.method = method
            method.process_lm_head(part)
        elif isinstance(part, Embedding):
            part.process(method)
        else:
            part.process_weights(method)

    def process_weights_after_loading(self, done: set[str] = frozenset()) -> None:
        """Let the linear method turn the loaded weights into its format (fuse, cast, prepack).

        Part by part, each converted weight replacing its fp32 one, so the peak is the model
        as loaded plus one layer. done: parts a loader converted already, as each was filled
        (`memlm.loading.base.WeightSink`), which keeps the peak near the converted model.
        """
        method = self.linear_method
        for name in self.weight_parts():
            if name not in done:
                self.process_part(name, method)
        if self.cfg.tie_word_embeddings:
            self.embed.method = method
            method.process_lm_head(self.embed)
        method.process_model(self)

    def convert_weights(self, method: LinearMethod) -> None:
        """Switch a loaded model to `method` (see `memlm.models.linear.set_weight_dtype`)."""
        self.linear_method = method
        self.process_weights_after_loading()

    def warm_up(self, max_rows: int, head_rows: int | None = None) -> None:
        """Create the linear method's per-shape state for batches of 1..max_rows rows, so a
        memory profile measures it as resident (bf16: oneDNN's, see `kernels.cpu.row_bucket`)."""
        self.linear_method.warm_up(self, max_rows, head_rows)

    def forward_dense(self, input_ids: torch.Tensor, hidden_states: list | None = None) -> torch.Tensor:
        """Training/scoring convenience: (B, T) ids -> (B, T, H) hidden states, no cache."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).repeat(B)
        h = self.forward(input_ids.reshape(-1), positions, DenseView(B, T), hidden_states)
        return h.view(B, T, -1)

    def num_parameters(self) -> int:
        """Weights as counted before any conversion (prepacked ones are not nn.Parameters)."""
        return sum(p.numel() for p in self.parameters()) + self.linear_method.held_outside_parameters(self)[0]

    def weight_bytes(self) -> int:
        """Bytes of weights as held in memory: parameters and buffers (shared tensors counted
        once) plus what the linear method holds outside them (prepacked copies)."""
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total + self.linear_method.held_outside_parameters(self)[1]
