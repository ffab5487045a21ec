"""Importance matrices: the real llama-imatrix built from the pinned sdist, the loader, IQ types end to end."""

from __future__ import annotations

import ctypes
import io
import struct
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import convert_to_f32, require_module, require_program, write_tiny_gguf

from cecai_converter import imatrix, llama_programs, llama_vocab
from cecai_converter.errors import ConversionFailed, ToolchainError, ToolNotFound, UsageError


def quantize(src: Path, dst: Path, precision: str, imatrix_data: imatrix.ImatrixData | None = None) -> int:
    """``llama_model_quantize`` in-process, as the pipeline's quantize worker calls it."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{precision}")
    params.nthread = 2
    if imatrix_data is not None:
        imatrix_data.apply(params)
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params))


# --- handmade imatrix files (fast) ------------------------------------------------------------------------------


def write_gguf_imatrix(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], **meta: object) -> Path:
    """An imatrix as llama-imatrix writes it: ``<name>.in_sum2`` [ne0, n_expert] and ``<name>.counts`` [n_expert]."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(meta.get("datasets", ["calib.txt"])))  # type: ignore[arg-type]
    writer.add_uint32("imatrix.chunk_count", int(meta.get("chunk_count", 3)))  # type: ignore[arg-type]
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        writer.add_tensor(f"{name}.counts", counts.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_legacy_imatrix(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> Path:
    buf = io.BytesIO()
    buf.write(struct.pack("<i", len(entries)))
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        buf.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
        buf.write(values.astype("<f4").tobytes())
    buf.write(struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode())
    path.write_bytes(buf.getvalue())
    return path


def test_gguf_imatrix_is_normalised_like_llama_quantize(tmp_path: Path) -> None:
    dense = np.arange(1, 9, dtype=np.float32) * 4  # 8 values seen 4 times
    experts = np.arange(12, dtype=np.float32).reshape(3, 4)  # 3 experts × 4 values; expert 1 never routed
    path = write_gguf_imatrix(
        tmp_path / "imatrix.gguf",
        {
            "blk.0.ffn_up.weight": (dense, np.array([4.0])),
            "blk.0.ffn_up_exps.weight": (experts, np.array([2.0, 0.0, 4.0])),
        },
    )
    data, info = imatrix.read_imatrix(path)
    np.testing.assert_allclose(data["blk.0.ffn_up.weight"], np.arange(1, 9))
    np.testing.assert_allclose(
        data["blk.0.ffn_up_exps.weight"], np.concatenate([experts[0] / 2, np.ones(4), experts[2] / 4])
    )
    assert info == {"datasets": ["calib.txt"], "chunk_count": 3, "chunk_size": 512, "legacy": False}


def test_gguf_imatrix_whose_sums_do_not_divide_into_its_counts_is_refused(tmp_path: Path) -> None:
    path = write_gguf_imatrix(
        tmp_path / "imatrix.gguf", {"blk.0.ffn_up.weight": (np.arange(10, dtype=np.float32), np.ones(3))}
    )
    with pytest.raises(UsageError, match=r"blk\.0\.ffn_up\.weight: 10 sums do not divide into 3 counts") as info:
        imatrix.read_imatrix(path)
    assert "llama-imatrix" in (info.value.hint or "")


def test_legacy_imatrix_is_divided_by_its_calls(tmp_path: Path) -> None:
    path = write_legacy_imatrix(
        tmp_path / "imatrix.dat", {"blk.0.attn_q.weight": (5, np.full(256, 10.0))}, chunks=7, dataset="wiki.txt"
    )
    data, info = imatrix.read_imatrix(path)
    np.testing.assert_allclose(data["blk.0.attn_q.weight"], np.full(256, 2.0))
    assert info["legacy"] and info["chunk_count"] == 7 and info["datasets"] == ["wiki.txt"]


def test_not_an_imatrix(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        imatrix.read_imatrix(tmp_path / "none.gguf")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\xff\xff\xff\x7f not an imatrix")
    with pytest.raises(UsageError, match=r"not an importance matrix|not a complete"):
        imatrix.read_imatrix(junk)
    model = write_tiny_gguf(tmp_path / "model.gguf", rows=4)
    with pytest.raises(UsageError, match="not an importance matrix") as info:
        imatrix.read_imatrix(model)
    assert "llama-imatrix" in (info.value.hint or "")
    nan = write_gguf_imatrix(tmp_path / "nan.gguf", {"a.weight": (np.array([np.nan] * 4), np.array([1.0]))})
    with pytest.raises(UsageError, match="NaN"):
        imatrix.read_imatrix(nan)


def test_load_for_quantize_builds_the_c_structures(tmp_path: Path) -> None:
    llama_cpp = require_module("llama", "llama_cpp")
    path = write_gguf_imatrix(
        tmp_path / "imx.gguf",
        {"b.weight": (np.full(256, 6.0), np.array([3.0])), "a.weight": (np.arange(4.0), np.array([1.0]))},
        datasets=["calibration.txt"],
        chunk_count=9,
    )
    imx = imatrix.load_for_quantize(path)
    assert imx.entries == {"a.weight": 4, "b.weight": 256}
    assert len(imx.array) == 3 and imx.array[2].name is None and imx.array[2].size == 0  # terminator
    by_name = {imx.array[i].name: imx.array[i] for i in range(2)}
    assert by_name[b"b.weight"].size == 256
    assert [by_name[b"a.weight"].data[i] for i in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert by_name[b"b.weight"].data[255] == pytest.approx(2.0)
    kv = {imx.kv_overrides[i].key: imx.kv_overrides[i] for i in range(len(imx.kv_overrides) - 1)}
    assert kv[b"quantize.imatrix.file"].value.val_str == b"imx.gguf"  # the name only, no local path
    assert kv[b"quantize.imatrix.dataset"].value.val_str == b"calibration.txt"
    assert kv[b"quantize.imatrix.entries_count"].value.val_i64 == 2
    assert kv[b"quantize.imatrix.chunks_count"].value.val_i64 == 9
    assert imx.kv_overrides[len(imx.kv_overrides) - 1].key == b""  # terminator
    params = llama_cpp.llama_model_quantize_default_params()
    imx.apply(params)
    assert ctypes.cast(params.imatrix, ctypes.c_void_p).value == ctypes.addressof(imx.array)
    assert ctypes.cast(params.kv_overrides, ctypes.c_void_p).value == ctypes.addressof(imx.kv_overrides)
    assert imx.describe() == {"file": "imx.gguf", "sha256": imx.sha256, "entries": 2}


# --- building (fast failure paths) -----------------------------------------------------------------------------


def fake_sdist(tmp_path: Path, cmakelists: str) -> Path:
    sdist = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        data = cmakelists.encode()
        member = tarfile.TarInfo("llama_cpp_python-0.0.0/vendor/llama.cpp/CMakeLists.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return sdist


def test_missing_cmake_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_programs.shutil, "which", lambda name: None)
    with pytest.raises(ToolNotFound, match="cmake") as info:
        llama_programs.build_tools(sdist=fake_sdist(tmp_path, ""), cache=tmp_path / "cache")
    assert "apt-get install cmake" in (info.value.hint or "")


def test_failed_build_says_what_it_builds_and_keeps_the_log_tail(tmp_path: Path) -> None:
    require_program("cmake", "cmake")
    sdist = fake_sdist(tmp_path, 'cmake_minimum_required(VERSION 3.14)\nmessage(FATAL_ERROR "vendored tree broken")\n')
    said: list[str] = []
    with pytest.raises(ToolchainError, match="vendored tree broken") as info:
        llama_programs.build_tools(
            sdist=sdist, cache=tmp_path / "cache", targets=["llama-perplexity"], progress=said.append
        )
    root = tmp_path / "cache" / "llama.cpp-tools" / "llama_cpp_python-0.0.0-cpu"
    assert "build.log" in info.value.message and str(root) in (info.value.hint or "")
    assert not (root / "bin" / "llama-perplexity").exists()
    # announced before it started: what, from what, where, for about how long, and where the log is
    assert len(said) == 1 and said[0].startswith("building llama-perplexity from llama_cpp_python-0.0.0.tar.gz in ")
    assert str(root) in said[0] and "minutes" in said[0] and str(root / "build.log") in said[0]
    # the source was extracted once and is kept for the next attempt
    marker = root / "src" / ".cecai-source.json"
    first = marker.stat().st_mtime_ns
    with pytest.raises(ToolchainError, match="vendored tree broken"):
        llama_programs.build_tools(
            sdist=sdist, cache=tmp_path / "cache", targets=["llama-perplexity"], progress=said.append
        )
    assert marker.stat().st_mtime_ns == first


def test_build_progress_lines_are_read_from_cmake() -> None:
    assert llama_programs._percent("[ 42%] Building CXX object src/llama.cpp.o\n") == 42
    assert llama_programs._percent("[100%] Built target llama-imatrix\n") == 100
    assert llama_programs._percent("[12/48] Building CXX object ggml.c.o\n") == 25  # Ninja
    assert llama_programs._percent("-- Configuring done\n") is None


def test_sdist_without_llama_cpp(tmp_path: Path) -> None:
    require_program("cmake", "cmake")
    sdist = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        member = tarfile.TarInfo("llama_cpp_python-0.0.0/setup.py")
        tar.addfile(member, io.BytesIO(b""))
    with pytest.raises(ToolchainError, match=r"holds no vendor/llama\.cpp"):
        llama_programs.build_tools(sdist=sdist, cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "llama.cpp-tools" / "llama_cpp_python-0.0.0-cpu" / "src").exists()


def test_one_extraction_for_converter_and_tools_stays_inside(tmp_path: Path) -> None:
    """toolchain.extract_llama_cpp serves both the converter (some prefixes) and the tools (all of the tree)."""
    from cecai_converter.toolchain import extract_llama_cpp

    sdist = tmp_path / "llama_cpp_python-0.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in (
            ("vendor/llama.cpp/CMakeLists.txt", b"project(x)\n"),
            ("vendor/llama.cpp/gguf-py/gguf/__init__.py", b""),
            ("vendor/llama.cpp/../escaped.txt", b"outside"),
            ("setup.py", b""),
        ):
            member = tarfile.TarInfo(f"llama_cpp_python-0.0.0/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    some = extract_llama_cpp(sdist, tmp_path / "some", ("gguf-py/",))
    assert [p.relative_to(some).as_posix() for p in sorted(some.rglob("*")) if p.is_file()] == [
        "gguf-py/gguf/__init__.py"
    ]
    whole = extract_llama_cpp(sdist, tmp_path / "whole")
    assert (whole / "CMakeLists.txt").read_bytes() == b"project(x)\n"
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))  # dest/../escaped.txt: refused
    assert not (whole / "setup.py").exists()


# --- the real tool (slow: the first build compiles llama.cpp, ~5-10 min on 2 cores; cached afterwards) ----------


@pytest.fixture(scope="module")
def tools(llama_programs: Callable[..., dict[str, Path]]) -> dict[str, Path]:
    return llama_programs()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_module("torch", "torch")
    from cecai_converter.modelgen import build_model

    root = tmp_path_factory.mktemp("imatrix")
    return convert_to_f32(build_model(root / "hf", "llama", seed=2), root / "tiny.f32.gguf")


@pytest.fixture(scope="module")
def computed(tools: dict[str, Path], base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imatrix-out") / "tiny.imatrix.gguf"
    return imatrix.compute(base, None, out, n_threads=2, tools=tools)


@pytest.mark.slow
def test_build_is_cached(tools: dict[str, Path]) -> None:
    assert set(tools) == set(llama_programs.TOOL_TARGETS)
    assert all(path.is_file() for path in tools.values())
    start = time.perf_counter()
    assert llama_programs.build_tools() == tools
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_compute_writes_a_gguf_imatrix(computed: Path) -> None:
    data, info = imatrix.read_imatrix(computed)
    assert any(name.startswith("blk.0.") for name in data)
    assert "output.weight" not in data  # llama-imatrix leaves the output tensor out by default
    assert all(np.all(np.isfinite(v)) and np.all(v >= 0) for v in data.values())
    assert info["datasets"] == ["calibration.txt"]  # the file name, not a local path
    assert info["chunk_count"] >= 2 and info["chunk_size"] == 512


@pytest.mark.slow
def test_calibration_text_too_short(tools: dict[str, Path], base: Path, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Four score and seven years ago. " * 20, encoding="utf-8")
    have = llama_vocab.count_tokens(base, text)
    assert have is not None and 0 < have < 1024
    with pytest.raises(UsageError, match="llama-imatrix needs at least 1024") as info:
        imatrix.compute(base, text, tmp_path / "x.gguf", n_threads=2, tools=tools)
    assert f"has only {have} tokens" in str(info.value)
    assert "CALIBRATION_TEXT" in (info.value.hint or "")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_count_tokens_agrees_with_llama_imatrix(tools: dict[str, Path], base: Path, tmp_path: Path) -> None:
    """The pre-check counts what the tool counts. The tool's own count is in its log, which llama.cpp can drop at
    exit under load (see explain_failure), so the tool runs until one run has printed it."""
    text = tmp_path / "short.txt"
    text.write_text("We hold these truths to be self-evident. " * 25, encoding="utf-8")
    cmd = [str(tools["llama-imatrix"]), "-m", str(base), "-f", str(text), "-o", str(tmp_path / "x.gguf")]
    cmd += ["-c", "512", "-b", "512", "--no-ppl", "-t", "1"]
    reported = None
    for _ in range(10):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert proc.returncode != 0
        found = imatrix._ONLY.search(proc.stdout + proc.stderr)
        if found:
            reported = int(found.group(1))
            break
    assert reported is not None, "llama-imatrix never printed its token count in 10 runs"
    assert llama_vocab.count_tokens(base, text) == reported


# What llama-imatrix printed on this machine: once whole, once with the logger's lines lost at exit.
_GPU_WARNINGS = (
    "warning: no usable GPU found, --gpu-layers option will be ignored\n"
    "warning: one possible reason is that llama.cpp was compiled without GPU support\n"
    "warning: consult docs/build.md for compilation instructions\n"
)
_WHOLE = _GPU_WARNINGS + (
    "0.00.016.455 I compute_imatrix: tokenizing the input ..\n"
    "0.00.016.608 E compute_imatrix: you need at least 1024 tokens for a context of 512 tokens\n"
    "0.00.016.608 E compute_imatrix: the data file you provided tokenizes to only 402 tokens\n"
)


def test_explain_failure_reads_the_tools_too_short_message() -> None:
    err = imatrix.explain_failure(_WHOLE, base_name="m.gguf", text_name="short.txt", return_code=1)
    assert isinstance(err, UsageError)
    assert "short.txt has only 402 tokens" in str(err) and "needs at least 1024 (two chunks of n_ctx=512)" in str(err)


def test_explain_failure_says_when_llama_cpp_lost_its_log() -> None:
    err = imatrix.explain_failure(_GPU_WARNINGS, base_name="m.gguf", text_name="t.txt", return_code=1)
    assert isinstance(err, ConversionFailed) and err.return_code == 1
    assert "llama-imatrix failed on m.gguf (exit status 1)" in str(err)
    assert "drops unflushed lines at exit" in str(err)
    kept = imatrix.explain_failure(
        _GPU_WARNINGS + "0.00.010.000 E main : failed to init\n", base_name="m.gguf", text_name="t.txt", return_code=1
    )
    assert isinstance(kept, ConversionFailed)
    assert "failed to init" in str(kept) and "drops unflushed" not in str(kept)


@pytest.mark.slow
def test_iq_type_needs_the_imatrix_and_works_with_it(
    tools: dict[str, Path], base: Path, computed: Path, tmp_path: Path
) -> None:
    from gguf import GGUFReader
    from llama_cpp import Llama

    assert quantize(base, tmp_path / "refused.gguf", "IQ2_XXS") != 0  # llama.cpp refuses IQ2_XXS without one

    imx = imatrix.load_for_quantize(computed)
    ours = tmp_path / "tiny.iq2_xxs.gguf"
    assert quantize(base, ours, "IQ2_XXS", imx) == 0
    reader = GGUFReader(ours)
    assert any(t.tensor_type.name == "IQ2_XXS" for t in reader.tensors)
    assert reader.get_field("quantize.imatrix.entries_count").contents() == len(imx.entries)

    # The same bytes as llama.cpp's own quantizer given the same file.
    ref = tmp_path / "ref.iq2_xxs.gguf"
    cmd = [str(tools["llama-quantize"]), "--imatrix", str(computed), str(base), str(ref), "IQ2_XXS", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    theirs = GGUFReader(ref)
    assert [(t.name, t.tensor_type) for t in reader.tensors] == [(t.name, t.tensor_type) for t in theirs.tensors]
    assert all(a.data.tobytes() == b.data.tobytes() for a, b in zip(reader.tensors, theirs.tensors, strict=True))

    llm = Llama(model_path=str(ours), n_ctx=64, verbose=False)
    out = llm("The lighthouse", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def test_count_tokens_is_none_when_it_cannot_count(tmp_path: Path) -> None:
    """A file llama.cpp cannot read gives no count (the tool then speaks for itself), and no crash here."""
    not_gguf = tmp_path / "m.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    text = tmp_path / "t.txt"
    text.write_text("some words", encoding="utf-8")
    assert llama_vocab.count_tokens(not_gguf, text) is None
