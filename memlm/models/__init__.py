"""Model definitions: blocks, the decoder, linear methods (weight formats), the KV interface,
and named presets."""
from memlm.models.transformer import Transformer

__all__ = ["Transformer"]
