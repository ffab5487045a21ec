"""`verify` on hostile GGUF files (issue 9, item 8): one clear FAIL line (or JSON row) per bad file, never a
traceback, a hang or a silent "ok … None"; the good files in the same call are still reported.

The files are written byte by byte (GGUF v3), so each one holds exactly the damage under test.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cecai_converter.errors import VerificationFailed
from cecai_converter.gguf_header import GGUFHeaderError, read_header
from cecai_converter.verify import read_back

_U32, _STR, _ARR = 4, 8, 9


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _gguf(*kvs: bytes, arch: bool = True) -> bytes:
    """A GGUF v3 file with ``kvs`` (after general.architecture) and one F32 tensor of 4 weights."""
    items = ([_kv("general.architecture", _STR, _s("llama"))] if arch else []) + list(kvs)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(items)) + b"".join(items)
    head += _s("token_embd.weight") + struct.pack("<IQIQ", 1, 4, 0, 0)
    head += b"\0" * (-len(head) % 32)
    return head + struct.pack("<4f", 0, 0, 0, 0)


def _nested(depth: int) -> bytes:
    """An array of an array of … (``depth`` levels) of an empty uint8 array."""
    return struct.pack("<IQ", _ARR, 1) * depth + struct.pack("<IQ", 0, 0)


HOSTILE = {
    "nested.gguf": (_gguf(_kv("x.deep", _ARR, _nested(100_000))), "nested more than 8 deep"),
    "alignment-str.gguf": (_gguf(_kv("general.alignment", _STR, _s("abc"))), "general.alignment is 'abc'"),
    "alignment-0.gguf": (_gguf(_kv("general.alignment", _U32, struct.pack("<I", 0))), "not a power of two"),
    "alignment-3.gguf": (_gguf(_kv("general.alignment", _U32, struct.pack("<I", 3))), "not a power of two"),
    "ftype-str.gguf": (_gguf(_kv("general.file_type", _STR, _s("Q8_0"))), "general.file_type is 'Q8_0'"),
    "ftype-12345.gguf": (
        _gguf(_kv("general.file_type", _U32, struct.pack("<I", 12345))),
        "general.file_type is 12345, which is not a llama.cpp file type",
    ),
    "five-dims.gguf": (
        b"GGUF"
        + struct.pack("<IQQ", 3, 1, 1)
        + _kv("general.architecture", _STR, _s("llama"))
        + _s("t")
        + struct.pack("<I", 5)
        + struct.pack("<5Q", 1, 1, 1, 1, 1)
        + struct.pack("<IQ", 0, 0),
        "has 5 dimensions",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_read_back_refuses_with_a_verification_error(tmp_path: Path, name: str) -> None:
    data, phrase = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(VerificationFailed, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        read_back(path)


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_header(fifo)  # opening it for reading would wait for a writer forever
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # release the reader before failing, so the test run itself does not hang
        with fifo.open("wb"):
            pass
        reader.join(timeout=10)
        pytest.fail("read_header blocked on a FIFO")
    assert isinstance(outcome[0], GGUFHeaderError) and "not a regular file" in str(outcome[0])


def test_the_good_files_still_read(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    good.write_bytes(_gguf(_kv("general.file_type", _U32, struct.pack("<I", 7))))
    facts = read_back(good)
    assert (facts.architecture, facts.precision, facts.tensor_count, facts.n_params) == ("llama", "Q8_0", 1, 4)
    aligned = tmp_path / "aligned.gguf"
    aligned.write_bytes(_gguf(_kv("general.alignment", _U32, struct.pack("<I", 32))))
    assert read_header(aligned).data_offset % 32 == 0


def _verify(*args: str | Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cecai_converter", "verify", "--no-load", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,  # a FIFO used to hang here forever
        check=False,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name, (data, _) in HOSTILE.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "good.gguf").write_bytes(_gguf(_kv("general.file_type", _U32, struct.pack("<I", 7))))
    (tmp_path / "mxfp4.gguf").write_bytes(_gguf(_kv("general.file_type", _U32, struct.pack("<I", 38))))
    (tmp_path / "untyped.gguf").write_bytes(_gguf())
    os.mkfifo(tmp_path / "pipe.gguf")
    return tmp_path


def test_verify_json_reports_every_file_good_and_bad(folder: Path) -> None:
    files = [folder / "good.gguf", *(folder / n for n in sorted(HOSTILE)), folder / "pipe.gguf"]
    result = _verify("--format", "json", *files)
    assert result.returncode == 2, result.stderr  # the FIFO is no GGUF file: bad input; every row is still there
    assert "Traceback" not in result.stderr
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert rows[0]["ok"] is True and rows[0]["precision"] == "Q8_0"
    for row in rows[1:]:
        assert row["ok"] is False, row
    errors = {Path(r["file"]).name: r["error"] for r in rows[1:]}
    for name, (_, phrase) in HOSTILE.items():
        assert phrase in errors[name], (name, errors[name])
    assert "not a regular file" in errors["pipe.gguf"]


def test_verify_on_a_path_that_is_no_gguf_is_bad_input(folder: Path) -> None:
    """Missing, a folder, a FIFO, a text file: exit 2 (bad input, as the README's exit codes say), each named in its
    row with the reason, the GGUF beside them still read; a GGUF with a bad inside is a failed verification, exit 1."""
    text = folder / "notes.gguf"
    text.write_text("not a model\n")
    paths = [folder / "missing.gguf", folder, folder / "pipe.gguf", text, folder / "good.gguf"]
    result = _verify("--format", "json", *paths)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    rows = json.loads(result.stdout)
    assert [r["ok"] for r in rows] == [False, False, False, False, True]
    assert [r.get("input_error") for r in rows] == [True, True, True, True, None]
    assert rows[0]["error"] == "missing.gguf: no such file"
    assert "not a regular file" in rows[1]["error"] and "not a regular file" in rows[2]["error"]
    assert rows[3]["error"] == "notes.gguf: not a GGUF file (it does not start with the GGUF magic)"
    assert "4 of the 5 path(s) given to verify name(s) no GGUF file" in result.stderr and "hint:" in result.stderr
    alone = _verify(folder / "missing.gguf")
    assert alone.returncode == 2 and alone.stdout.startswith("FAIL ")
    inside = _verify(folder / "good.gguf", folder / "nested.gguf")
    assert inside.returncode == 1, inside.stderr


def test_verify_human_names_the_type_or_fails_never_none(folder: Path) -> None:
    names = ("good.gguf", "mxfp4.gguf", "untyped.gguf", "ftype-12345.gguf")
    result = _verify(*(folder / n for n in names))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = dict(zip(names, result.stdout.splitlines(), strict=True))
    assert lines["good.gguf"].startswith("ok ") and " llama Q8_0 1 tensors" in lines["good.gguf"]
    assert "MOSTLY_MXFP4_MOE (file type 38)" in lines["mxfp4.gguf"]
    assert "(no general.file_type)" in lines["untyped.gguf"]
    assert lines["ftype-12345.gguf"].startswith("FAIL ") and "12345" in lines["ftype-12345.gguf"]
    assert "None" not in result.stdout
