"""Hub sources end to end through the CLI, against a local stand-in for the Hugging Face Hub.

The Hub is not reachable from the test machines. ``tests/hub_stand_in.py`` serves the part of its API that
huggingface_hub's ``model_info`` and ``snapshot_download`` use, and ``HF_ENDPOINT`` points the CLI at it; what
these tests prove is the converter's side (which files it asks for, the pinned revision in the manifest, the error
mapping, the token handling), against the Hub's documented shapes, not the real Hub.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from conftest import CliResult, ggufs_under
from hub_stand_in import HubStandIn

from cecai_converter.source import HUB_PATTERNS
from cecai_converter.toolchain import cache_root

REPO = "octo/tiny-llama"
TOKEN = "hf_standInSecretToken0123456789"  # a test token
#: in the repo but not matched by HUB_PATTERNS: must never be requested
UNWANTED = {".gitattributes": b"*.safetensors filter=lfs\n", "README.md": b"# tiny\n", "pytorch_model.bin": b"\x80pk"}
_HF_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_DISABLE_IMPLICIT_TOKEN")


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as server:
        yield server


@pytest.fixture
def hub_env(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The CLI's environment: the stand-in as the Hub, every cache in tmp_path (the toolchain's stays shared)."""
    for name in _HF_ENV:
        monkeypatch.delenv(name, raising=False)
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
        "CECAI_TOOLCHAIN_DIR": str(cache_root()),  # resolved before XDG_CACHE_HOME moves: no re-download
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


@pytest.fixture
def convert(cli: Callable[..., CliResult], hub_env: dict[str, str], tmp_path: Path) -> Callable[..., CliResult]:
    def run(repo: str = REPO, *extra: str, env: dict[str, str] | None = None) -> CliResult:
        args = ["convert", repo, "--precision", "Q8_0", "--outdir", tmp_path / "out", "--no-fidelity"]
        return cli(*args, "--log-file", tmp_path / "convert.log", *extra, env={**hub_env, **(env or {})})

    return run


def _wanted(model: Path) -> set[str]:
    return {p.name for p in model.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in HUB_PATTERNS)}


def _assert_clean_error(result: CliResult, code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr


@pytest.mark.slow
def test_hub_stand_in_convert_pins_the_revision_and_downloads_only_needed_files(hub, convert, tiny_llama, tmp_path):
    repo = hub.add_repo(REPO, tiny_llama, extra_files=UNWANTED)
    result = convert(REPO, "--revision", "main", "--format", "json")
    assert result.returncode == 0, result.stderr

    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["source"]
    assert source["kind"] == "hub" and source["repo_id"] == REPO
    assert re.fullmatch(r"[0-9a-f]{40}", source["revision"]) and source["revision"] == repo.sha
    assert source["fingerprint"]
    [entry] = manifest["files"]
    assert entry["precision"] == "Q8_0" and entry["name"] == "tiny-llama.q8_0.gguf"
    assert entry["verification"]["generated_tokens"]
    assert ggufs_under(out) == [out / "tiny-llama.q8_0.gguf"]
    assert json.loads(result.stdout)["files"][0]["precision"] == "Q8_0"

    # `main` was resolved once, then everything was fetched at the commit (a moving branch cannot change mid-run).
    assert any(r.path.startswith(f"/api/models/{REPO}/revision/main") for r in hub.requests)
    assert all(f"/resolve/{repo.sha}/" in r.path for r in hub.requests if "/resolve/" in r.path)
    fetched = set(hub.resolve_requests("GET"))
    assert fetched == _wanted(tiny_llama) == {"config.json", "model.safetensors", "tokenizer.model",
                                              "tokenizer_config.json"}  # fmt: skip
    asked = fetched | set(hub.resolve_requests("HEAD"))
    assert not asked & set(UNWANTED)
    # The download went to the converter's own cache under XDG_CACHE_HOME, never the user's.
    local = tmp_path / "xdg-cache" / "cecai-converter" / "hub" / "octo--tiny-llama" / repo.sha
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == sorted(fetched)


def test_hub_stand_in_missing_repo_is_a_usage_error(hub, convert, tmp_path):
    result = convert("octo/no-such-model")
    _assert_clean_error(result, 2)
    assert "not found" in result.stderr and "octo/no-such-model" in result.stderr
    assert "HF_TOKEN" in result.stderr  # the hint: a private repo looks missing without a token
    assert ggufs_under(tmp_path / "out") == []


def test_hub_stand_in_missing_revision_is_a_usage_error(hub, convert, tiny_llama, tmp_path):
    hub.add_repo(REPO, tiny_llama)
    result = convert(REPO, "--revision", "no-such-branch")
    _assert_clean_error(result, 2)
    assert "revision 'no-such-branch' not found" in result.stderr
    assert not hub.resolve_requests("GET")
    assert ggufs_under(tmp_path / "out") == []


@pytest.mark.parametrize("token", [None, "hf_notGrantedToken"], ids=["no-token", "token-not-granted"])
def test_hub_stand_in_gated_repo_is_a_usage_error_naming_hf_token_and_licence(hub, convert, tiny_llama, token):
    hub.add_repo(REPO, tiny_llama, gated=True, tokens=(TOKEN,))
    result = convert(REPO, env={"HF_TOKEN": token} if token else None)
    _assert_clean_error(result, 2)
    assert "gated" in result.stderr and "HF_TOKEN" in result.stderr and "licence" in result.stderr
    assert not hub.resolve_requests("GET")
    assert ("not been granted" if token else "HF_TOKEN is not set") in result.stderr
    if token:
        assert token not in result.stderr + result.stdout


def test_hub_stand_in_private_repo_without_token_looks_missing(hub, convert, tiny_llama):
    hub.add_repo(REPO, tiny_llama, private=True, tokens=(TOKEN,))
    result = convert(REPO)
    _assert_clean_error(result, 2)
    assert "not found" in result.stderr and "HF_TOKEN" in result.stderr
    assert [r for r in hub.requests if REPO in r.path]
    assert all(r.authorization is None for r in hub.requests)


@pytest.mark.slow
def test_hub_stand_in_private_repo_with_hf_token_sends_it_and_never_prints_it(hub, convert, tiny_llama, tmp_path):
    repo = hub.add_repo(REPO, tiny_llama, extra_files=UNWANTED, private=True, tokens=(TOKEN,))
    result = convert(REPO, "--format", "json", env={"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr

    to_repo = [r for r in hub.requests if REPO in r.path]
    assert to_repo and all(r.authorization == f"Bearer {TOKEN}" for r in to_repo)
    assert set(hub.resolve_requests("GET")) == _wanted(tiny_llama)
    out = tmp_path / "out"
    manifest_text = (out / "manifest.json").read_text()
    assert json.loads(manifest_text)["source"]["revision"] == repo.sha
    for text in (result.stdout, result.stderr, (tmp_path / "convert.log").read_text(), manifest_text):
        assert TOKEN not in text
    # Nothing the run wrote (outputs, logs, the download cache) holds the token either.
    for path in [*out.rglob("*"), *(tmp_path / "xdg-cache").rglob("*")]:
        if path.is_file() and path.stat().st_size < 1 << 20:
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("mode", ["500", "go-away"])
def test_hub_stand_in_failing_mid_download_fails_cleanly_without_partial_files(hub, convert, tiny_llama, tmp_path,
                                                                               mode):  # fmt: skip
    hub.add_repo(REPO, tiny_llama)
    hub.fail_downloads["model.safetensors"] = mode
    result = convert(REPO, "--revision", "main")
    _assert_clean_error(result, 1)
    assert f"downloading {REPO} failed" in result.stderr
    assert "HF_ENDPOINT" in result.stderr  # the hint
    assert "model.safetensors" in hub.resolve_requests("GET")
    if mode == "go-away":
        assert hub.gone.is_set() and "Connection refused" in result.stderr
    out = tmp_path / "out"
    assert ggufs_under(out) == []
    assert not (out / "manifest.json").exists()
    # huggingface_hub removes its own partial download: no half weight file is left to be mistaken for a whole one.
    cache = tmp_path / "xdg-cache" / "cecai-converter" / "hub"
    assert not [p for p in cache.rglob("*") if p.name.endswith((".incomplete", ".safetensors"))]


def test_hub_stand_in_invalid_repo_id_is_a_usage_error(hub, convert):
    result = convert("octo/not a valid id!")
    _assert_clean_error(result, 2)
    assert "not a valid Hub repo id" in result.stderr
    assert not [r for r in hub.requests if "octo/" in r.path]
