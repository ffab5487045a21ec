"""``cecai-convert audit``: any GGUF against the model it claims to come from, run as a user runs it (a separate
process, real exit codes), with real transformers and real llama-cpp-python.

A file from another conversion of the same source passes (exit 0); a file from another source fails (exit 1) and
says what differs; bad input exits 2. The Hub path is the one every conversion uses (source.fetch_from_hub), tested
against the Hub stand-in in test_hub.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _convert(model_dir: Path, outfile: Path, outtype: str) -> Path:
    from cecai_converter.convert import run_converter
    from cecai_converter.source import check_model_dir
    from cecai_converter.toolchain import ensure_converter

    run_converter(ensure_converter(), check_model_dir(model_dir), outfile, outtype, model_name=model_dir.name)
    return outfile


@pytest.fixture(scope="module")
def files(model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama, a BF16 conversion of it, and a conversion of another model with the same tokenizer."""
    folder = tmp_path_factory.mktemp("audit")
    model = model_factory("llama")
    other = model_factory("llama", seed=1)  # the same architecture and tokenizer, other weights
    return {
        "source": model,
        "same": _convert(model, folder / "same.bf16.gguf", "bf16"),
        "other": _convert(other, folder / "other.f32.gguf", "f32"),
    }


@pytest.mark.slow
def test_a_file_from_another_conversion_of_the_source_passes(cli: Any, files: dict[str, Path]) -> None:
    result = cli("audit", files["same"], "--source", files["source"], "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["faithful"] is True and report["source"] == {"kind": "local", "path": str(files["source"])}
    (row,) = report["files"]
    parity = row["source_parity"]
    assert row["faithful"] and parity["passed"] and parity["base"] == "same.bf16.gguf"
    assert parity["logits"]["nmse"] < 1e-4 and parity["tokenizer"]["n_differing"] == 0


def test_a_quantized_file_is_held_to_the_quantized_limit_and_says_which() -> None:
    from cecai_converter.audit import MAX_NMSE_QUANTIZED, default_nmse_limit
    from cecai_converter.precisions import PRECISIONS
    from cecai_converter.source_parity import MAX_NMSE

    for name in ("F32", "F16", "BF16", "Q8_0"):
        assert default_nmse_limit(PRECISIONS[name].ftype) == (MAX_NMSE, f"{name}: the conversion limit")
    limit, why = default_nmse_limit(PRECISIONS["Q4_K_M"].ftype)
    assert limit == MAX_NMSE_QUANTIZED > MAX_NMSE and why.startswith("Q4_K_M: quantized below 8 bits")
    assert default_nmse_limit(None)[0] == default_nmse_limit(9999)[0] == MAX_NMSE  # unknown: the strict limit


@pytest.mark.slow
def test_a_q4_k_m_file_of_the_source_passes_with_its_limit_recorded(
    cli: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    from cecai_converter.precisions import PRECISIONS
    from cecai_converter.quantize import quantize

    q4 = tmp_path / "same.q4_k_m.gguf"
    quantize(files["same"], q4, PRECISIONS["Q4_K_M"])
    result = cli("audit", q4, "--source", files["source"], "--format", "json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["files"]
    assert row["nmse_limit"] == 0.1 and row["nmse_limit_why"].startswith("Q4_K_M")
    assert 0 < row["source_parity"]["logits"]["nmse"] < 0.1
    # held to the conversion limit instead, a file that is faithful but quantized is told apart from a lossless one
    strict = cli("audit", q4, "--source", files["source"], "--max-nmse", "1e-6")
    assert strict.returncode == 1 and "max_nmse" in strict.stdout


@pytest.mark.slow
def test_a_file_from_another_source_fails_and_says_why(cli: Any, files: dict[str, Path]) -> None:
    result = cli("audit", files["same"], files["other"], "--source", files["source"])
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"ok    {files['same']}: passed, NMSE ")
    assert lines[2].startswith(f"FAIL  {files['other']}: FAILED, NMSE ")
    # same tokenizer and hyperparameters, other weights: the logits are what differs
    assert lines[3].startswith("      - the GGUF's logits differ from the source's: nmse ")
    assert "tokenizer 0/" in lines[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/file.gguf"], "error: GGUF file not found: /no/such/file.gguf"),
        (["{same}", "--max-nmse", "0"], "error: --max-nmse must be a positive number"),
        (["{not_gguf}"], "is not a readable GGUF file"),
        (["{same}", "--source-folder-without-config"], "the folder has no config.json"),
        (["{same}", "--source-bad"], "is neither a model folder nor a Hub repo id"),
    ],
)
@pytest.mark.slow
def test_bad_input_exits_2(cli: Any, files: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a GGUF file")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    source: list[str | Path] = ["--source", files["source"]]
    if "--source-folder-without-config" in args:
        source = ["--source", empty]
    elif "--source-bad" in args:
        source = ["--source", "./not/a/folder/or/repo"]
    argv = [a.format(same=files["same"], not_gguf=not_gguf) for a in args if not a.startswith("--source-")]
    result = cli("audit", *argv, *source)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_hub_stand_in_source_is_downloaded_pinned_and_compared(
    cli: Any, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Hub is not reachable here: the stand-in answers what fetch_from_hub asks (tests/hub_stand_in.py).
    from hub_stand_in import HubStandIn

    from cecai_converter.toolchain import cache_root

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with HubStandIn() as hub:
        repo = hub.add_repo("octo/tiny-llama", files["source"])
        env = {
            "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "XDG_CACHE_HOME": str(tmp_path / "xdg"), "CECAI_TOOLCHAIN_DIR": str(cache_root()),
        }  # fmt: skip
        result = cli("audit", files["same"], "--source", "octo/tiny-llama@main", "--format", "json", env=env)
        missing = cli("audit", files["same"], "--source", "octo/no-such-model", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"] == {"kind": "hub", "repo_id": "octo/tiny-llama", "revision": repo.sha}
    assert report["faithful"] is True and report["files"][0]["source_parity"]["logits"]["nmse"] < 1e-4
    assert missing.returncode == 2 and "not found" in missing.stderr
