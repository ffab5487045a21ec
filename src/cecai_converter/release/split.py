"""GGUF splitting: GitHub refuses a release asset of 2 GiB or more, so a GGUF file of :data:`SIZE_LIMIT` bytes or
more is split in llama.cpp's split format (what ``llama-gguf-split --split`` writes: ``<name>-00001-of-0000N.gguf``,
``split.*`` keys), which llama.cpp and llama-cpp-python load directly from the first part.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from ..errors import UsageError
from ..fsutil import sha256_file
from ..output import get_logger
from .assets import LocalAsset

__all__ = ["SIZE_LIMIT", "SPLIT_NAME", "original_name", "split_gguf", "split_large"]

#: GitHub refuses release assets of 2 GiB or more; stay below 2,000,000,000 bytes (2 GB).
SIZE_LIMIT: Final = 2_000_000_000
#: The name of one part of a split file: ``<stem>-00001-of-0000N.gguf``.
SPLIT_NAME: Final = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_log = get_logger("publish")


def split_gguf(path: Path, outdir: Path, *, size_limit: int = SIZE_LIMIT) -> list[Path]:
    """Split a GGUF file into parts that are each smaller than ``size_limit`` bytes, the way ``gguf-split`` does.

    The first part keeps every key/value of the original; every part carries ``split.no`` (u16),
    ``split.count`` (u16) and ``split.tensors.count`` (i32), and its share of the tensors in the original order.
    Parts are named ``<stem>-00001-of-0000N.gguf``; llama.cpp loads the set from the first part.

    Raises:
        UsageError: the file is not GGUF, or one tensor (plus the header) cannot fit under the limit.
    """
    # The reader/writer of the pinned llama.cpp; imported here because it loads numpy and only a split needs it.
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path} is not a readable GGUF file: {exc}") from None
    alignment = int(reader.alignment)
    # Budget per part for tensor data: what is left after the original header (the first part carries all of it)
    # and the worst-case alignment padding of every tensor.
    header = int(reader.data_offset) + 256
    budget = size_limit - header - alignment * len(reader.tensors)
    biggest = max((int(t.n_bytes) for t in reader.tensors), default=0)
    if biggest > budget:
        raise UsageError(
            f"{path.name}: a tensor of {biggest} bytes cannot fit in a part below {size_limit} bytes",
            hint="GGUF files are split between tensors; a single tensor larger than the limit cannot be split",
        )
    outdir.mkdir(parents=True, exist_ok=True)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else "llama"
    writer = gguf.GGUFWriter(outdir / path.name, arch=arch, endianess=reader.endianess, split_max_size=budget)
    writer.data_alignment = alignment
    for fld in reader.fields.values():
        if fld.name == gguf.Keys.General.ARCHITECTURE or fld.name.startswith(("GGUF.", "split.")):
            continue
        vtype = fld.types[0]
        sub_type = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(fld.name, fld.contents(), vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    names = writer.format_shard_names(outdir / path.name)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    finally:
        writer.close()
    too_big = [p for p in names if p.stat().st_size >= size_limit]
    if too_big:
        raise UsageError(f"splitting {path.name} left a part of {too_big[0].stat().st_size} bytes (limit {size_limit})")
    return names


def split_large(
    assets: Iterable[LocalAsset], staging: Path, size_limit: int
) -> tuple[list[LocalAsset], dict[str, list[str]]]:
    """``assets`` with every GGUF file of ``size_limit`` bytes or more replaced by its parts (split into
    ``staging``); also returns original file name → part names."""
    out: list[LocalAsset] = []
    split: dict[str, list[str]] = {}
    for asset in assets:
        if asset.kind != "gguf" or asset.size < size_limit:
            out.append(asset)
            continue
        _log.info(f"splitting {asset.name} ({asset.size} bytes) into parts below {size_limit} bytes")
        parts = split_gguf(asset.path, staging / asset.name.removesuffix(".gguf"), size_limit=size_limit)
        split[asset.name] = [p.name for p in parts]
        for part in parts:
            out.append(
                LocalAsset(
                    part.name,
                    part,
                    part.stat().st_size,
                    sha256_file(part),
                    "split",
                    precision=asset.precision,
                    split_of=asset.name,
                )
            )
    return out, split


def original_name(name: str) -> str:
    """The GGUF file a split part was cut from (the name itself for any other file)."""
    m = SPLIT_NAME.match(name)
    return f"{m['stem']}.gguf" if m else name
