"""The decoder: embeddings, a stack of `DecoderLayer`s run in `cfg.layer_order`, final norm,
and the LM head (tied to the embeddings or not).

Owns: assembling blocks from a `ModelConfig` and the forward pass over flattened tokens.
Does not know: paging, batching policy or sampling; it receives a `KVView` and returns hidden
states, and computes logits only for the rows the caller asks for.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from memlm.config import ModelConfig
from memlm.models.blocks import DecoderLayer, Rotary, make_norm
from memlm.models.kv import DenseView


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, m, tuple(d for d, j in enumerate(cfg.layer_order) if j == i))
            for i, m in enumerate(cfg.mixers))
        self.final_norm = make_norm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta) if cfg.position == "rope" else None

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
        """(n, H) -> (n, vocab) fp32 logits. Call only on the rows that need them."""
        return torch.nn.functional.linear(hidden, self.lm_head_weight)

    def forward_dense(self, input_ids: torch.Tensor, hidden_states: list | None = None) -> torch.Tensor:
        """Training/scoring convenience: (B, T) ids -> (B, T, H) hidden states, no cache."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).repeat(B)
        h = self.forward(input_ids.reshape(-1), positions, DenseView(B, T), hidden_states)
        return h.view(B, T, -1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weight_bytes(self) -> int:
        """Bytes of parameters and buffers as held in memory (shared tensors counted once)."""
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total
