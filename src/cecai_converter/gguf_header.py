"""A fast, strict reader of a GGUF file's header: metadata scalars and tensor infos, never the tensor data.

``gguf.GGUFReader`` builds a numpy view for every item of every array field; on a 32k-token vocabulary that takes
seconds per file, which verification of every output cannot afford. This reader steps over arrays, keeps the
scalar and string values, and checks what a truncated or damaged file gets wrong: the magic, the version, every
length against the file size, and that the data section holds every tensor's bytes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from .errors import GGUFHeaderError

__all__ = ["GGUFHeader", "GGUFHeaderError", "TensorInfo", "read_header"]

_MAGIC: Final = b"GGUF"
_DEFAULT_ALIGNMENT: Final = 32
# value type → struct format of one item (GGUF spec: uint8 … float64; 8 = string, 9 = array)
_SCALARS: Final = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Real files nest arrays one level at most; the limit keeps a hostile file from exhausting the stack.
_MAX_ARRAY_DEPTH: Final = 8
_MAX_DIMS: Final = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's name, shape, ggml type and offset in the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def n_elements(self) -> int:
        """The number of weights."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class GGUFHeader:
    """A file's version, scalar/string metadata (arrays are skipped) and tensor infos."""

    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int


class _Reader:
    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh = fh
        self.size = size

    def take(self, n: int) -> bytes:
        if n < 0 or self.fh.tell() + n > self.size:
            raise GGUFHeaderError(f"truncated: needs {n} bytes at offset {self.fh.tell()}, the file has {self.size}")
        return self.fh.read(n)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if n < 0 or self.fh.tell() + n > self.size:
            raise GGUFHeaderError(f"truncated: an array runs past the end of the file ({self.size} bytes)")
        self.fh.seek(n, 1)

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type == _ARRAY and depth + 1 >= _MAX_ARRAY_DEPTH:
                raise GGUFHeaderError(f"metadata arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            if item_type in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[item_type]))
            elif item_type == _STRING:
                for _ in range(count):
                    self.skip(self.unpack("<Q"))
            else:
                for _ in range(count):
                    self.value(item_type, depth + 1)
            return None  # arrays (vocabularies, scores) are not needed to verify a file
        raise GGUFHeaderError(f"unknown metadata value type {vtype}")


def _tensor_bytes(info: TensorInfo) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    except (ValueError, KeyError):
        raise GGUFHeaderError(f"tensor {info.name} has an unknown ggml type {info.ggml_type}") from None
    return info.n_elements // block * type_size


def read_header(path: Path) -> GGUFHeader:
    """Read and check ``path``'s header.

    Raises:
        GGUFHeaderError: not a regular file (a FIFO would block forever), bad magic or version, a length past the end
            of the file, an unknown type, arrays nested too deep, a ``general.alignment`` that is not a power of
            two, more than 4 dimensions, or a data section too short for the tensors it declares.
        OSError: the file cannot be opened.
    """
    # Opened without blocking and checked on the open descriptor: opening a FIFO for reading would wait forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise GGUFHeaderError("not a regular file (a folder, FIFO, socket or device)")
    with contextlib.closing(os.fdopen(fd, "rb")) as fh:
        size = info.st_size
        r = _Reader(fh, size)
        if r.take(4) != _MAGIC:
            raise GGUFHeaderError("not a GGUF file (bad magic)")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise GGUFHeaderError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.unpack("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if n_dims > _MAX_DIMS:
                raise GGUFHeaderError(f"tensor {name[:100]!r} has {n_dims} dimensions; llama.cpp allows {_MAX_DIMS}")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            tensors.append(TensorInfo(name, shape, r.unpack("<I"), r.unpack("<Q")))
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise GGUFHeaderError(f"general.alignment is {alignment!r:.40}: not a power of two (llama.cpp needs one)")
        data_offset = -(-fh.tell() // alignment) * alignment
    end = max((data_offset + t.offset + _tensor_bytes(t) for t in tensors), default=data_offset)
    if end > size:
        raise GGUFHeaderError(f"truncated: the tensors need {end} bytes, the file has {size}")
    return GGUFHeader(version=version, metadata=metadata, tensors=tuple(tensors), data_offset=data_offset)
