"""Root cause 1 of issue 16, "writes through planted names": no writer follows a symbolic link someone left in a
folder this tool writes to, and no reader of a model file (GGUF) follows one.

Each writer is tried with each kind of planted link: at the final name (refused, exit 2, the message names the
path, the link's target untouched) and at the temporary name the old writers used, ``.<name>.partial`` (never
used now: the write lands inside the folder, the link's target untouched or never created). The fsutil tests cover
every way in; the command tests run the real ``card``, ``check``, ``convert``, ``sign``, ``report`` and ``verify``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_module, run_cli, write_tiny_gguf

from cecai_converter import fsutil
from cecai_converter.cli import main
from cecai_converter.errors import ConversionFailed, SymlinkRefused, UsageError

SECRET = "the victim's file: must stay as it is\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the one written to, holding ``victim`` (an existing file a link may point at)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim").write_text(SECRET)
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def plant(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def assert_untouched(outside: Path, *, not_created: Path | None = None) -> None:
    assert (outside / "victim").read_text() == SECRET
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]  # nothing created beside it either
    if not_created is not None:
        assert not not_created.exists()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") and not p.is_symlink())


# ---------------------------------------------------------------------------------------------- the safe writers

WRITERS = {
    "text": lambda path: fsutil.atomic_write_text(path, "new text\n"),
    "json": lambda path: fsutil.atomic_write_json(path, {"new": True}),
    "bytes": lambda path: fsutil.atomic_write_bytes(path, b"\x89PNG new"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_planted_link_at_the_final_name_is_refused(writer, dangling, folder, outside):
    target = outside / ("missing" if dangling else "victim")
    link = plant(folder / "manifest.json", target)
    with pytest.raises(SymlinkRefused) as info:
        WRITERS[writer](link)
    assert info.value.exit_code == 2
    assert str(link) in info.value.message and "symbolic link" in info.value.message
    assert str(link) in (info.value.hint or "") and "remove" in (info.value.hint or "")
    assert_untouched(outside, not_created=outside / "missing")
    assert link.is_symlink() and leftovers(folder) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_planted_link_at_the_old_temporary_name_is_not_followed(writer, dangling, folder, outside):
    target = outside / ("missing" if dangling else "victim")
    plant(folder / ".manifest.json.partial", target)
    WRITERS[writer](folder / "manifest.json")
    assert_untouched(outside, not_created=outside / "missing")
    written = folder / "manifest.json"
    assert written.is_file() and not written.is_symlink()
    assert leftovers(folder) == []  # the fresh temporary file was renamed into place


def test_planted_link_temporary_names_are_fresh_and_unpredictable(folder, monkeypatch):
    seen: list[str] = []
    real_replace = os.replace

    def spy(src, dst):  # records the temporary names the writer chose; the rename itself is the real one
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", spy)
    for _ in range(3):
        fsutil.atomic_write_text(folder / "README.md", "x")
    assert len(set(seen)) == 3
    assert all(n.startswith(".README.md.") and n.endswith(".partial") and n != ".README.md.partial" for n in seen)


def test_planted_link_at_the_final_name_of_a_folder_or_fifo_is_refused_too(folder):
    (folder / "reference.json").mkdir()
    with pytest.raises(UsageError, match="not a regular file"):
        fsutil.atomic_write_json(folder / "reference.json", {})
    assert leftovers(folder) == []


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_planted_link_install_file_refuses_the_final_name(dangling, folder, outside, tmp_path):
    src = tmp_path / "staged.gguf"
    src.write_bytes(b"GGUF staged")
    link = plant(folder / "model.sig", outside / ("missing" if dangling else "victim"))
    with pytest.raises(SymlinkRefused) as info:
        fsutil.install_file(src, link)
    assert str(link) in info.value.message and info.value.exit_code == 2
    assert_untouched(outside, not_created=outside / "missing")
    assert leftovers(folder) == []


@pytest.mark.parametrize("copy", [False, True], ids=["hard-link", "copy"])
def test_planted_link_install_file_ignores_the_old_temporary_name(copy, folder, outside, tmp_path, monkeypatch):
    src = tmp_path / "staged.gguf"
    src.write_bytes(b"GGUF staged")
    plant(folder / ".model.sig.partial", outside / "victim")
    plant(folder / ".tiny.q8_0.gguf.partial", outside / "missing")
    if copy:  # a staged file on another filesystem (signing stages in /tmp): os.link fails with EXDEV there

        def no_link(*_a, **_k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(fsutil.os, "link", no_link)
    fsutil.install_file(src, folder / "model.sig")
    fsutil.install_file(src, folder / "tiny.q8_0.gguf")
    for name in ("model.sig", "tiny.q8_0.gguf"):
        assert not (folder / name).is_symlink() and (folder / name).read_bytes() == b"GGUF staged"
    assert_untouched(outside, not_created=outside / "missing")
    assert leftovers(folder) == []


def test_planted_link_write_target_keeps_the_name_and_resolves_the_folder(folder, outside, tmp_path):
    via = plant(tmp_path / "via", folder)  # a link to the folder itself: the user's choice, followed
    link = plant(folder / "README.md", outside / "victim")
    assert fsutil.write_target(via / "README.md") == folder.resolve() / "README.md"
    assert fsutil.write_target(link) == link  # not outside/victim, as resolve() gives
    with pytest.raises(UsageError, match="names a folder"):
        fsutil.write_target(folder / "..")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KB tmpfs: too small for the file written (a real full disk, as in test_messages)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs as a full disk")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("could not mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_planted_link_safe_writer_keeps_the_disk_full_message(small_disk):
    with pytest.raises(ConversionFailed) as info:
        fsutil.atomic_write_bytes(small_disk / "tiny.fidelity.png", b"\0" * (1 << 20))
    assert "the disk is full" in info.value.message and str(small_disk) in info.value.message
    assert list(small_disk.iterdir()) == []  # the partial file is gone


# ------------------------------------------------------------------------------------------ the commands' writers


def card_manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": 1,
        "tool": {"name": "cecai-converter", "version": "9.9.9"},
        "toolchain": {"llama_cpp_python": "0.3.36", "sdist_sha256": "c" * 64},
        "pair": None,
        "model_name": "tiny",
        "source": {"kind": "local", "path": "/models/tiny", "fingerprint": "f" * 64, "files": []},
        "base": {"precision": "F32", "kept": False},
        "imatrix": None,
        "files": [{"name": "tiny.q8_0.gguf", "precision": "Q8_0", "bytes": 1234, "sha256": "ab" * 32}],
    }
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_planted_link_card_refuses_a_linked_readme(dangling, folder, outside, capsys):
    card_manifest(folder)
    link = plant(folder / "README.md", outside / ("missing" if dangling else "victim"))
    assert main(["card", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "symbolic link" in err
    assert_untouched(outside, not_created=outside / "missing")


def test_planted_link_card_ignores_the_old_temporary_name(folder, outside, capsys):
    card_manifest(folder)
    plant(folder / ".README.md.partial", outside / "victim")
    assert main(["card", str(folder)]) == 0, capsys.readouterr().err
    assert str(folder / "README.md") in capsys.readouterr().out  # the message names the file written
    assert_untouched(outside)
    card = folder / "README.md"
    assert not card.is_symlink() and card.read_text().startswith("---\n")


def test_planted_link_card_output_through_a_linked_folder_is_named_as_written(folder, outside, tmp_path, capsys):
    card_manifest(folder)
    via = plant(tmp_path / "via", outside)  # -o through a link the user typed: followed, and named as resolved
    assert main(["card", str(folder), "-o", str(via / "card.md")]) == 0
    assert str(outside.resolve() / "card.md") in capsys.readouterr().out
    assert (outside / "card.md").is_file()


def report_manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fid = {"kld_mean": 0.01, "ppl": 10.1, "ppl_base": 10.0, "ppl_delta_pct": 1.0, "top1_agreement": 0.9}
    files = [
        {"name": f"tiny.{p.lower()}.gguf", "precision": p, "bytes": size, "sha256": "0" * 64, "fidelity": fid}
        for p, size in (("Q8_0", 1_964_928), ("Q4_K_M", 1_170_272))
    ]
    data = {"schema": 1, "model_name": "tiny", "pair": "CPU_LLM_LLAMA", "base": {"precision": "F32"}, "files": files}
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder / "manifest.json"


def test_planted_link_report_plot_refuses_a_linked_png(folder, outside, tmp_path, capsys, monkeypatch):
    require_module("matplotlib", "matplotlib")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    manifest = report_manifest(tmp_path / "made")
    plots = tmp_path / "plots"
    plots.mkdir()
    link = plant(plots / "tiny.CPU_LLM_LLAMA.fidelity.png", outside / "victim")
    assert main(["report", str(manifest), "--plot", str(plots)]) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "symbolic link" in err
    assert_untouched(outside)
    link.unlink()
    plant(plots / ".tiny.CPU_LLM_LLAMA.fidelity.png.partial", outside / "victim")
    assert main(["report", str(manifest), "--plot", str(plots)]) == 0
    png = plots / "tiny.CPU_LLM_LLAMA.fidelity.png"
    assert not png.is_symlink() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_untouched(outside)


def test_planted_link_signature_is_refused_before_signing(folder, outside, tmp_path):
    require_module("signing", "model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from cecai_converter import signing

    key = tmp_path / "signer.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (folder / "a.gguf").write_bytes(b"GGUF")
    link = plant(folder / signing.SIGNATURE_NAME, outside / "victim")
    with pytest.raises(SymlinkRefused) as info:
        signing.sign_folder(folder, key=key)
    assert str(link) in info.value.message
    assert_untouched(outside)


# ------------------------------------------------------------------- GGUFs that are links: one rule, every reader


def test_planted_link_gguf_is_refused_by_verify_and_report(folder, outside, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    real = write_tiny_gguf(outside / "real.gguf", rows=8)
    link = plant(folder / "tiny.q8_0.gguf", real)
    assert main(["verify", "--no-load", str(link)]) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "symbolic link" in err
    manifest = report_manifest(folder)
    assert main(["report", str(manifest)]) == 2  # it would measure bits per weight through the link
    err = capsys.readouterr().err
    assert str(link) in err and "symbolic link" in err


def test_planted_link_gguf_is_refused_by_publish_as_a_loose_file(outside, folder):
    from cecai_converter.release.assets import collect_assets

    link = plant(folder / "tiny.q8_0.gguf", write_tiny_gguf(outside / "real.gguf", rows=8))
    with pytest.raises(SymlinkRefused, match="symbolic link"):
        collect_assets([link])


# ------------------------------------------------------------------------- real conversions and checks (slow)


@pytest.fixture(scope="module")
def planted_made(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``convert`` into a folder where links were planted at the old temporary names of the manifest, the
    reference and the GGUF (dangling and not); returns (outputs folder, outside folder)."""
    root = tmp_path_factory.mktemp("planted")
    out, outside = root / "out", root / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "victim").write_text(SECRET)
    plant(out / ".manifest.json.partial", outside / "manifest-target")
    plant(out / ".reference.json.partial", outside / "victim")
    plant(out / ".tiny.q8_0.gguf.partial", outside / "gguf-target")
    result = run_cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", out, "--model-name", "tiny",
                     "--no-fidelity")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, outside


@pytest.mark.slow
def test_planted_link_convert_writes_manifest_reference_and_gguf_inside(planted_made):
    out, outside = planted_made
    assert_untouched(outside)
    for name in ("manifest.json", "reference.json", "tiny.q8_0.gguf"):
        assert (out / name).is_file() and not (out / name).is_symlink()


def files_of(made: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "files"
    shutil.copytree(made, dest, symlinks=True, ignore=shutil.ignore_patterns(".*"))
    return dest


@pytest.mark.slow
def test_planted_link_check_refuses_a_linked_record_before_any_work(planted_made, tmp_path, capsys):
    files = files_of(planted_made[0], tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text(SECRET)
    link = plant(files / "tiny.cpu.check.json", outside / "victim")
    assert main(["check", str(files), "--pair", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "symbolic link" in err and "loading" not in err
    assert_untouched(outside)


@pytest.mark.slow
def test_planted_link_check_refuses_a_linked_gguf(planted_made, tmp_path, capsys):
    files = files_of(planted_made[0], tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    gguf = files / "tiny.q8_0.gguf"
    shutil.move(gguf, outside / "real.gguf")
    plant(gguf, outside / "real.gguf")
    assert main(["check", str(files), "--pair", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(gguf) in err and "symbolic link" in err
    assert not (files / "tiny.cpu.check.json").exists()


@pytest.mark.slow
def test_planted_link_check_record_ignores_the_old_temporary_name(planted_made, tmp_path, capsys):
    files = files_of(planted_made[0], tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text(SECRET)
    plant(files / ".tiny.cpu.check.json.partial", outside / "victim")
    plant(files / ".tiny.cpu.check.json.partial.x", outside / "missing")  # a near miss: never used either
    assert main(["check", str(files), "--pair", "cpu"]) == 0, capsys.readouterr().err
    record = files / "tiny.cpu.check.json"
    assert not record.is_symlink() and json.loads(record.read_text())["passed"] is True
    assert str(record) in capsys.readouterr().out
    assert_untouched(outside)
