"""A lean, bounds-checked reader for the GGUF container (v2/v3, little-endian).

Owns: parsing the header, metadata key/values and tensor infos of a GGUF file, and handing out
zero-copy numpy views of each tensor's bytes from a read-only memory map.
Does not know: what the metadata means or how tensors map to a model (`gguf.py`).

Why not `gguf.GGUFReader`: it wraps every metadata element (each of ~100k vocabulary strings and
merges) in its own numpy memmap object, costing ~160 MB of RSS and ~2.5 s for SmolLM2's 49k-token
vocabulary, all of it alive while the weights load. Here strings are decoded straight to Python
values. Dequantization still uses the `gguf` package (`gguf.quants`).

Layout:
    "GGUF" u32 version | u64 n_tensors | u64 n_kv | n_kv x (key, u32 type, value)
    | n_tensors x (name, u32 n_dims, u64 dims[n_dims] (fastest first), u32 ggml_type, u64 offset)
    | padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlm.errors import ModelLoadError, UnsupportedModelError

# GGUF metadata value types -> struct format (8 = string, 9 = array are handled separately)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 32     # anything larger in a count field means a corrupt header


# the tensor types memlm loads: kept as blocks where the linear method keeps them (Q8_0, Q4_0,
# Q4_1, Q4_K, Q5_K, Q6_K), otherwise dequantized by gguf-py
SUPPORTED_TYPES = ("F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                   "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4")


class _Truncated(Exception):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]          # numpy order (slowest first), e.g. (out, in) for a Linear
    ggml_type: object               # gguf.GGMLQuantizationType
    offset: int                     # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """Metadata (`.metadata`: key -> Python value) and tensors (`.tensors`: name -> TensorInfo)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:          # empty file
                raise ModelLoadError(f"{path} is empty: it is not a GGUF file; download or convert it again") from e
        self._pos = 0
        try:
            self._parse()
        except _Truncated as e:
            raise ModelLoadError(f"{path} is a corrupt or truncated GGUF file ({e}); "
                                 "download or convert it again") from None
        except (UnicodeDecodeError, struct.error, OverflowError) as e:
            raise ModelLoadError(f"{path} is a corrupt or truncated GGUF file ({e}); "
                                 "download or convert it again") from None

    # ---- primitive reads (all bounds-checked) -----------------------------------------------
    def _take(self, n: int) -> int:
        start = self._pos
        if n < 0 or start + n > len(self._mm):
            raise _Truncated(f"header needs {n} bytes at offset {start}, file has {len(self._mm)}")
        self._pos += n
        return start

    def _scalar(self, vtype: int):
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, self._mm, self._take(struct.calcsize(fmt)))[0]

    def _count(self) -> int:
        n = self._scalar(10)
        if n > _MAX_COUNT:
            raise _Truncated(f"implausible count {n} at offset {self._pos - 8}")
        return n

    def _string(self) -> str:
        n = self._count()
        start = self._take(n)
        return bytes(self._mm[start:start + n]).decode("utf-8")

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, n = self._scalar(4), self._count()
            if etype == _STRING:
                return [self._string() for _ in range(n)]
            if etype not in _NP:
                raise _Truncated(f"unknown array element type {etype}")
            start = self._take(n * np.dtype(_NP[etype]).itemsize)
            return np.frombuffer(self._mm, _NP[etype], n, start).tolist()
        if vtype not in _SCALARS:
            raise _Truncated(f"unknown metadata value type {vtype}")
        return self._scalar(vtype)

    # ---- structure --------------------------------------------------------------------------
    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        magic = bytes(self._mm[:4])
        if magic != b"GGUF":
            raise ModelLoadError(f"{self.path} is not a GGUF file (bad magic bytes {magic!r}): pass a .gguf "
                                 "file produced by llama.cpp's convert_hf_to_gguf.py")
        self._pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise UnsupportedModelError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3, "
                                        "little-endian); re-convert with a current llama.cpp")
        n_tensors, n_kv = self._count(), self._count()
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            if n_dims > 8:
                raise _Truncated(f"tensor {name!r} claims {n_dims} dimensions")
            dims = [self._scalar(10) for _ in range(n_dims)]
            raw_type, offset = self._scalar(4), self._scalar(10)
            infos.append((name, dims, raw_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise _Truncated(f"invalid general.alignment {align}")
        data_start = -(-self._pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, raw_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise UnsupportedModelError(f"{self.path}: tensor {name} has unknown GGML type id {raw_type}; "
                                            f"re-quantize it to one of {', '.join(SUPPORTED_TYPES)}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elems = int(np.prod(dims)) if dims else 1
            if n_elems % block:
                raise _Truncated(f"tensor {name} has {n_elems} elements, not a multiple of {qtype.name} blocks")
            n_bytes = n_elems // block * type_size
            start = data_start + offset
            if start + n_bytes > len(self._mm):
                raise _Truncated(f"tensor {name} ends at byte {start + n_bytes}, past the end of the "
                                 f"{len(self._mm)}-byte file")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, start, n_bytes)

    def raw(self, info: TensorInfo) -> np.ndarray:
        """Zero-copy read-only view of a tensor's bytes, in the shape `gguf.quants.dequantize` takes."""
        from gguf import GGMLQuantizationType as T
        from gguf.quants import quant_shape_to_byte_shape

        typed = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8,
                 T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}
        if info.ggml_type in typed:
            dtype = np.dtype(typed[info.ggml_type])
            return np.frombuffer(self._mm, dtype, info.n_bytes // dtype.itemsize, info.offset).reshape(info.shape)
        shape = quant_shape_to_byte_shape(info.shape, info.ggml_type)
        return np.frombuffer(self._mm, np.uint8, info.n_bytes, info.offset).reshape(shape)

    def drop_pages(self, info: TensorInfo) -> None:
        """Tell the kernel we are done with a tensor's mapped pages so they leave our RSS."""
        start = info.offset - info.offset % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, info.offset + info.n_bytes - start)
        except (AttributeError, OSError, ValueError):
            pass
