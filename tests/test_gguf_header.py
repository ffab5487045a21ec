"""The fast header reader agrees with gguf's own reader on real files and refuses damaged ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import convert_to_f32
from gguf import GGUFReader

from cecai_converter.gguf_header import GGUFHeaderError, read_header


@pytest.fixture(scope="module")
def gguf_file(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_to_f32(tiny_llama, tmp_path_factory.mktemp("hdr") / "tiny.f32.gguf")


@pytest.mark.slow
def test_agrees_with_gguf_reader(gguf_file: Path) -> None:
    header = read_header(gguf_file)
    reader = GGUFReader(gguf_file)
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    assert [t.n_elements for t in header.tensors] == [int(t.n_elements) for t in reader.tensors]
    assert header.data_offset == reader.data_offset
    for key in ("general.architecture", "general.file_type", "general.name", "llama.block_count"):
        assert header.metadata[key] == reader.fields[key].contents(), key
    assert header.metadata["tokenizer.ggml.tokens"] is None  # arrays are skipped, not decoded


@pytest.mark.slow
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.999])
def test_truncated_files_are_refused(gguf_file: Path, tmp_path: Path, keep: float) -> None:
    cut = tmp_path / "cut.gguf"
    data = gguf_file.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFHeaderError, match="truncated"):
        read_header(cut)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(GGUFHeaderError, match="bad magic"):
        read_header(other)
