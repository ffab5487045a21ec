"""FIDELITY_ON=check: the builder ships its base instead of measuring, a check measures fidelity on its runtime and
its record carries it, publish names the runtime that measured it and refuses a release whose checks did not.

Real conversions of the tiny model and real llama-cpp-python measurements on this machine's CPU: the GPU check job
this is meant for cannot run here, so the CPU pair's check is asked to measure (``--fidelity true``), and ``auto``
is shown declining on a runtime without GPU offload.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult

from cecai_converter.errors import ManifestError
from cecai_converter.fsutil import sha256_file
from cecai_converter.manifest import Manifest, load_manifest
from cecai_converter.option_table import spec_of
from cecai_converter.pairs import PAIRS
from cecai_converter.records import record_name
from cecai_converter.release.manifests import check_failures, fidelity_measured, release_manifest
from cecai_converter.request import resolve


def test_fidelity_on_takes_builder_or_check_from_every_source() -> None:
    spec = spec_of("fidelity_on")
    assert spec.default == "builder" and spec.env == "CECAI_FIDELITY_ON" and spec.yaml_key == "FIDELITY_ON"
    assert resolve({}, {"FIDELITY_ON": "check"}, {}).values["fidelity_on"] == "check"
    assert resolve({}, {}, {"CECAI_FIDELITY_ON": " Check "}).values["fidelity_on"] == "check"


def test_fidelity_on_refuses_anything_else_naming_where(cli: Callable[..., CliResult]) -> None:
    from cecai_converter.errors import ConfigError, UsageError

    with pytest.raises(UsageError, match=r"CECAI_FIDELITY_ON='gpu' is not a place") as info:
        resolve({}, {}, {"CECAI_FIDELITY_ON": "gpu"})
    assert "builder" in (info.value.hint or "")
    with pytest.raises(ConfigError, match=r"the configuration: FIDELITY_ON"):
        resolve({}, {"FIDELITY_ON": True}, {})
    result = cli("convert", "m", "--precision", "Q8_0", "--fidelity-on", "somewhere")
    assert result.returncode == 2 and "--fidelity-on" in result.stderr and "Traceback" not in result.stderr


def test_a_manifest_with_another_fidelity_on_is_refused() -> None:
    with pytest.raises(ManifestError, match="fidelity_on: expected builder, check or null"):
        Manifest.from_dict({"schema": 1, "fidelity_on": "gpu"})


@pytest.fixture(scope="module")
def shipped(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A builder's outputs folder made with --fidelity-on check (Q8_0 only, no source check: not what is tested)."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("shipped") / "out"
    result = run_cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", out, "--model-name", "tiny",
                     "--fidelity-on", "check", "--no-source-check")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_the_builder_ships_its_base_and_measures_nothing(shipped: Path) -> None:
    manifest = load_manifest(shipped / "manifest.json")
    assert manifest.fidelity_on == "check"
    assert [e.name for e in manifest.files] == ["tiny.q8_0.gguf"]  # the base is no published file
    assert manifest.files[0].fidelity is None
    base = manifest.base or {}
    assert base["file"] != "tiny.q8_0.gguf" and (shipped / base["file"]).is_file()
    assert sha256_file(shipped / base["file"]) == base["sha256"]
    assert not (manifest.timings or {}).get("fidelity_s")


@pytest.mark.slow
def test_a_check_measures_fidelity_when_asked_and_publish_names_its_runtime(
    shipped: Path, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    manifest = load_manifest(shipped / "manifest.json")
    # auto: the manifest asks, but this runtime offloads nothing to a GPU: not measured, and the record says why
    auto_path = tmp_path / "auto.check.json"
    result = cli("check", shipped, "--pair", "cpu", "--record", auto_path)
    assert result.returncode == 0, result.stderr
    auto = json.loads(auto_path.read_text())
    assert auto["fidelity"]["measured"] is False and "GPU" in auto["fidelity"]["reason"]
    assert "fidelity" not in auto["files"][0]
    refused = check_failures({"tiny": release_manifest(manifest, [auto])}, None)
    assert any("fidelity-on is check, but no check record measured" in p for p in refused), refused

    # true: measured here, on the CPU
    result = cli("check", shipped, "--pair", "cpu", "--fidelity", "true")
    assert result.returncode == 0, result.stderr
    record = json.loads((shipped / record_name("tiny", PAIRS["CPU_LLM_LLAMA"])).read_text())
    assert record["fidelity"]["measured"] is True and record["fidelity"]["device"] == "cpu"
    assert record["fidelity"]["base"] == (manifest.base or {})["file"]
    row = record["files"][0]
    assert row["passed"] is True
    assert 0 <= row["fidelity"]["kld_mean"] < 1 and row["fidelity"]["n_tokens"] > 0
    assert row["fidelity"]["kld_mean_se"] >= 0 and row["fidelity"]["device"] == "cpu"
    assert fidelity_measured(record, manifest)

    published = release_manifest(manifest, [auto, record])
    assert check_failures({"tiny": published}, None) == []
    fid = published.files[0].fidelity or {}
    assert fid["measured_by"] == {"pair": "CPU_LLM_LLAMA", "device": "cpu"}
    assert fid["kld_mean"] == row["fidelity"]["kld_mean"]


@pytest.mark.slow
def test_a_check_refuses_other_bytes_of_the_base(shipped: Path, cli: Callable[..., CliResult], tmp_path: Path) -> None:
    import shutil

    files = tmp_path / "files"
    shutil.copytree(shipped, files)
    manifest = load_manifest(files / "manifest.json")
    base = files / (manifest.base or {})["file"]
    data = bytearray(base.read_bytes())
    data[-1] ^= 0xFF
    base.write_bytes(bytes(data))
    result = cli("check", files, "--pair", "cpu", "--fidelity", "true")
    assert result.returncode == 1
    record = json.loads((files / record_name("tiny", PAIRS["CPU_LLM_LLAMA"])).read_text())
    assert record["fidelity"]["measured"] is False
    assert any("is not the builder's" in p for p in record["problems"]), record["problems"]


def test_the_docker_check_passes_the_fidelity_mode_into_the_container(tmp_path: Path) -> None:
    from cecai_converter.backends.container_spec import check_spec

    def command(**kw: str) -> tuple[str, ...]:
        spec = check_spec(tmp_path, tmp_path / "r.check.json", pair=PAIRS["GPU_LLM_LLAMA"], uid_gid=(1, 1), **kw)
        return spec.command

    assert "--fidelity" not in command()  # auto: the container decides from the manifest and its GPU
    cmd = command(fidelity="true")
    assert cmd[cmd.index("--fidelity") + 1] == "true"
