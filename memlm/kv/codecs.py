"""KV codecs: how the paged pool stores each layer's K/V rows, and how they are read back.

Owns: the codec contract (`KVCodec`: allocate the pool's tensors, encode new rows, decode a
range of blocks, exact bytes per token including scales), the codecs behind the one dtype
vocabulary (fp32 / fp16 / bf16 stored as is, int8 with one scale per token and head, int4 /
int2 KIVI-style) and the pure quantize / pack functions the KIVI layout is defined by, which
the decode kernel's torch reference (`kernels/attention_kivi.py`) reuses.
Does not know: block ownership, which blocks are partial (`window.py` keeps those in fp16 for
the block codecs), attention.

KIVI (Liu et al. 2024), per layer, KV head and block of `block_size` tokens:

    keys   per channel: k[t, c] ~ code[t, c] * ks[c] + km[c], (ks, km) over the block's tokens
    values per token:   v[t, c] ~ code[t, c] * vs[t, g] + vm[t, g], g = c // group
    codes: 2**bits levels (asymmetric: scale + min), packed little-end first along channels
           (int4: byte j = c[2j] | c[2j+1] << 4; int2: byte j = c[4j] | .. | c[4j+3] << 6)

Keys are encoded a whole block at a time (per-channel statistics need all its tokens), so a
block codec's `encode_blocks` takes full blocks; values could go per token but go with them.
Every tensor is (layers, 1 or 2, slots, ...) with the slot (block * block_size + offset) on
axis 2, so tiers can export and import blocks without knowing the layout.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from memlm import dtypes

KIVI_VALUE_GROUP = {"int4": 64, "int2": 32}   # channels per value (scale, min) pair


class KVCodec(ABC):
    """One layout of the pool. Token codecs (`block_granular` False) encode any rows in place;
    block codecs encode whole blocks (`encode_blocks`) and need a window for partial ones."""

    name = ""
    block_granular = False

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, device="cpu"):
        self.n_layers, self.num_blocks, self.block_size = n_layers, num_blocks, block_size
        self.n_kv_heads, self.head_dim, self.device = n_kv_heads, head_dim, device

    @abstractmethod
    def block_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the pool by name, each (layers, 1 or 2, slots, ...)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.block_tensors().values())

    def encode(self, li: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows k, v (N, nkv, hd) at `slots` (N,) of layer `li` (token codecs only)."""
        raise TypeError(f"the {self.name} KV codec encodes whole blocks: use encode_blocks")

    def encode_blocks(self, li: int, blocks: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store whole blocks k, v (nb, bs, nkv, hd) into `blocks` (nb,) of layer `li`."""
        slots = (blocks[:, None] * self.block_size + torch.arange(self.block_size, device=blocks.device))
        self.encode(li, slots.reshape(-1), k.flatten(0, 1), v.flatten(0, 1))

    @abstractmethod
    def decode(self, li: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nb,) block ids -> k, v (nb, bs, nkv, hd) fp32 as stored (partial blocks: `window.py`)."""

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """(slots, ...) -> (num_blocks, bs, ...) view."""
        return t.view(self.num_blocks, self.block_size, *t.shape[1:])


class FloatCodec(KVCodec):
    """fp32 / fp16 / bf16: rows stored as is in `kv` (layers, 2, slots, nkv, hd)."""

    def __init__(self, name: str, *args, **kw):
        super().__init__(*args, **kw)
        self.name, self.dtype = name, dtypes.to_torch(name)
        self.kv = torch.zeros(self.n_layers, 2, self.num_blocks * self.block_size, self.n_kv_heads,
                              self.head_dim, dtype=self.dtype, device=self.device)

    @classmethod
    def bytes_per_token_of(cls, name: str, n_kv_heads: int, head_dim: int) -> float:
        return 2 * n_kv_heads * head_dim * dtypes.to_torch(name).itemsize

    def block_tensors(self):
        return {"kv": self.kv}

    def encode(self, li, slots, k, v):
        self.kv[li, 0].index_copy_(0, slots, k.to(self.dtype))
        self.kv[li, 1].index_copy_(0, slots, v.to(self.dtype))

    def decode(self, li, blocks):
        return self._blocks(self.kv[li, 0])[blocks].float(), self._blocks(self.kv[li, 1])[blocks].float()


class Int8Codec(KVCodec):
    """int8 rows, one fp32 scale per token and KV head (symmetric, max|x| / 127; llama.cpp's
    q8_0 with a head-wide block): `kv` (layers, 2, slots, nkv, hd) int8, `scales` (layers, 2,
    slots, nkv) fp32. The native decode kernel reads this layout (`kernels/attention.py`)."""

    name = "int8"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        slots = self.num_blocks * self.block_size
        self.kv = torch.zeros(self.n_layers, 2, slots, self.n_kv_heads, self.head_dim,
                              dtype=torch.int8, device=self.device)
        self.scales = torch.zeros(self.n_layers, 2, slots, self.n_kv_heads, device=self.device)

    @classmethod
    def bytes_per_token_of(cls, n_kv_heads: int, head_dim: int) -> float:
        return 2 * n_kv_heads * (head_dim + 4)

    def block_tensors(self):
        return {"kv": self.kv, "scales": self.scales}

    def encode(self, li, slots, k, v):
        for j, x in enumerate((k, v)):
            x = x.float()
            scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0                 # (N, nkv)
            self.kv[li, j].index_copy_(0, slots, torch.round(x / scale[..., None]).to(torch.int8))
            self.scales[li, j].index_copy_(0, slots, scale)

    def decode(self, li, blocks):
        out = []
        for j in range(2):
            x = self._blocks(self.kv[li, j])[blocks].float()                      # (nb, bs, nkv, hd)
            out.append(x * self._blocks(self.scales[li, j])[blocks][..., None])
        return out[0], out[1]


# ---- the KIVI layout: pure functions ------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., hd) uint8 codes < 2**bits -> (..., hd * bits / 8) uint8."""
    per = 8 // bits
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.uint8)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., hd * bits / 8) uint8 -> (..., hd) uint8 codes."""
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).flatten(-2)


def _affine(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Codes of x for per-group [lo, hi] (broadcast), and (scale, min) rounded to fp16 first, so
    decoding with the stored fp16 pair reproduces what the codes were chosen for."""
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).to(torch.float16)
    mn = lo.to(torch.float16)
    s32, m32 = scale.float(), mn.float()
    q = torch.where(s32 > 0, (x - m32) / s32.clamp_min(1e-30), torch.zeros_like(x))
    return torch.round(q).clamp_(0, levels).to(torch.uint8), scale, mn


def quantize_keys(k: torch.Tensor, bits: int):
    """k (nb, bs, nkv, hd) -> codes (nb, bs, nkv, hd) uint8, params (nb, nkv, 2, hd) fp16 (scale, min)."""
    k = k.float()
    lo, hi = k.amin(dim=1, keepdim=True), k.amax(dim=1, keepdim=True)          # (nb, 1, nkv, hd)
    codes, scale, mn = _affine(k, lo, hi, bits)
    return codes, torch.stack([scale[:, 0], mn[:, 0]], dim=2)


def quantize_values(v: torch.Tensor, bits: int, group: int):
    """v (n, nkv, hd) -> codes (n, nkv, hd) uint8, params (n, nkv, hd / group, 2) fp16 (scale, min)."""
    n, nkv, hd = v.shape
    g = v.float().view(n, nkv, hd // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    codes, scale, mn = _affine(g, lo, hi, bits)
    return codes.view(n, nkv, hd), torch.cat([scale, mn], dim=-1)


def dequantize_keys(packed: torch.Tensor, params: torch.Tensor, bits: int) -> torch.Tensor:
    """packed (nb, bs, nkv, hd*bits/8), params (nb, nkv, 2, hd) -> (nb, bs, nkv, hd) fp32."""
    p = params.float()
    return unpack(packed, bits).float() * p[:, None, :, 0] + p[:, None, :, 1]


def dequantize_values(packed: torch.Tensor, params: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """packed (..., nkv, hd*bits/8), params (..., nkv, hd/group, 2) -> (..., nkv, hd) fp32."""
    c = unpack(packed, bits).float()
    c = c.view(*c.shape[:-1], c.shape[-1] // group, group)
    p = params.float()
    return (c * p[..., :1] + p[..., 1:]).flatten(-2)


class KiviCodec(KVCodec):
    """int4 / int2 KIVI blocks (module docstring). Tensors:

        codes     (layers, 2, slots, nkv, hd * bits / 8) uint8   K and V codes
        k_params  (layers, 1, slots, kp)  fp16   per block: (nkv, 2, hd) scale/min rows, spread
                                                 over its slots (kp = ceil(2 * nkv * hd / bs))
        v_params  (layers, 1, slots, nkv, hd / group, 2) fp16    per token and group
    """

    block_granular = True

    def __init__(self, name: str, *args, **kw):
        super().__init__(*args, **kw)
        self.name, self.bits = name, dtypes.BITS[name]
        self.group = value_group(name, self.head_dim)
        if self.head_dim % (8 // self.bits):
            raise ValueError(f"kv_dtype {name} needs a head size divisible by {8 // self.bits}, "
                             f"got {self.head_dim}; use --kv-dtype int8")
        L, slots, nkv, hd = self.n_layers, self.num_blocks * self.block_size, self.n_kv_heads, self.head_dim
        self.codes = torch.zeros(L, 2, slots, nkv, hd * self.bits // 8, dtype=torch.uint8, device=self.device)
        self.k_params = torch.zeros(L, 1, slots, k_param_slot_width(self.block_size, nkv, hd),
                                    dtype=torch.float16, device=self.device)
        self.v_params = torch.zeros(L, 1, slots, nkv, hd // self.group, 2, dtype=torch.float16,
                                    device=self.device)

    @classmethod
    def bytes_per_token_of(cls, name: str, block_size: int, n_kv_heads: int, head_dim: int) -> float:
        bits, group = dtypes.BITS[name], value_group(name, head_dim)
        codes = 2 * n_kv_heads * head_dim * bits / 8
        return codes + 2 * k_param_slot_width(block_size, n_kv_heads, head_dim) + n_kv_heads * (head_dim // group) * 4

    def block_tensors(self):
        return {"codes": self.codes, "k_params": self.k_params, "v_params": self.v_params}

    def key_params(self, li: int) -> torch.Tensor:
        """(num_blocks, nkv, 2, hd) fp16 view of layer `li`'s key scales and mins."""
        nkv, hd = self.n_kv_heads, self.head_dim
        rows = self.k_params[li, 0].view(self.num_blocks, -1)                 # (num_blocks, bs * kp)
        return rows[:, :2 * nkv * hd].view(self.num_blocks, nkv, 2, hd)

    def encode_blocks(self, li, blocks, k, v):
        nb, bs = k.shape[:2]
        kc, kp = quantize_keys(k, self.bits)
        vc, vp = quantize_values(v.flatten(0, 1), self.bits, self.group)
        slots = (blocks[:, None] * bs + torch.arange(bs, device=blocks.device)).reshape(-1)
        self.codes[li, 0].index_copy_(0, slots, pack(kc, self.bits).flatten(0, 1))
        self.codes[li, 1].index_copy_(0, slots, pack(vc, self.bits))
        self.key_params(li)[blocks] = kp
        self.v_params[li, 0].index_copy_(0, slots, vp)

    def decode(self, li, blocks):
        kc = self._blocks(self.codes[li, 0])[blocks]
        vc = self._blocks(self.codes[li, 1])[blocks]
        k = dequantize_keys(kc, self.key_params(li)[blocks], self.bits)
        v = dequantize_values(vc, self._blocks(self.v_params[li, 0])[blocks], self.bits, self.group)
        return k, v


def value_group(name: str, head_dim: int) -> int:
    """Channels per value (scale, min): the codec's group, or the whole head if it is smaller."""
    g = KIVI_VALUE_GROUP[name]
    return g if head_dim % g == 0 else head_dim


def k_param_slot_width(block_size: int, n_kv_heads: int, head_dim: int) -> int:
    """fp16 key parameters each slot carries (a block's 2 * nkv * hd, spread over its slots)."""
    return -(-2 * n_kv_heads * head_dim // block_size)


def bytes_per_token(name: str, block_size: int, n_kv_heads: int, head_dim: int) -> float:
    """Stored bytes of one token's K and V in one layer for codec `name`, scales included."""
    if name in KIVI_VALUE_GROUP:
        return KiviCodec.bytes_per_token_of(name, block_size, n_kv_heads, head_dim)
    if name == "int8":
        return Int8Codec.bytes_per_token_of(n_kv_heads, head_dim)
    return FloatCodec.bytes_per_token_of(name, n_kv_heads, head_dim)


def make_codec(name: str, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
               head_dim: int, device="cpu") -> KVCodec:
    """The codec for canonical KV dtype `name`, its pool allocated (zeros: every page touched)."""
    args = (n_layers, num_blocks, block_size, n_kv_heads, head_dim, device)
    if name in KIVI_VALUE_GROUP:
        return KiviCodec(name, *args)
    if name == "int8":
        return Int8Codec(*args)
    return FloatCodec(name, *args)
