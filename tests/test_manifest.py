"""The typed manifest (``cecai_converter.manifest``): exact round trips, refusals that name their field, and keys
of newer writers kept.

The round trip is checked on the manifest of a real conversion (the pinned llama.cpp converter and quantizer on a
small generated Llama, verified and measured), and on its published form.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import logged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cecai_converter.errors import EXIT_USAGE, ManifestError, UsageError
from cecai_converter.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    file_is_current,
    load_manifest,
    read_manifest,
    write_manifest,
)

ENTRY: dict[str, Any] = {"name": "m.q8_0.gguf", "precision": "Q8_0", "bytes": 3, "sha256": "ab" * 32}
GOOD: dict[str, Any] = {"schema": 1, "model_name": "m", "pair": None, "files": [ENTRY]}


def with_entry(**changes: Any) -> dict[str, Any]:
    return {**GOOD, "files": [{**ENTRY, **changes}]}


# ------------------------------------------------------------------------------------------- a real conversion


@pytest.mark.slow
def test_a_real_conversion_manifest_round_trips_exactly(tiny_llama: Path, tmp_path: Path) -> None:
    from cecai_converter import job_summary
    from cecai_converter.output import Output
    from cecai_converter.pairs import PAIRS
    from cecai_converter.pipeline import Job, Target, run_job
    from cecai_converter.precisions import parse_precisions
    from cecai_converter.release.manifests import release_manifest
    from cecai_converter.request_options import Options

    outdir = tmp_path / "outputs" / "CPU_LLM_LLAMA"
    job = Job(
        model=str(tiny_llama),
        model_name="m",
        precisions=parse_precisions(["Q8_0", "Q4_K_M"]),
        targets=(Target(outdir, PAIRS["CPU_LLM_LLAMA"]),),
        options=Options(fidelity=True),
    )
    (returned,) = run_job(job, Output(stderr=io.StringIO()))
    text = (outdir / MANIFEST_NAME).read_text(encoding="utf-8")
    raw = json.loads(text)
    manifest = Manifest.from_dict(raw, path=outdir / MANIFEST_NAME)

    assert manifest.to_dict() == raw
    assert json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n" == text  # byte for byte
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert returned == manifest and returned.path == outdir / MANIFEST_NAME
    assert {e.precision for e in manifest.files} == {"Q8_0", "Q4_K_M"}
    for entry in manifest.files:
        assert entry.verification and entry.verification["generated_tokens"]
        assert entry.fidelity is not None and entry.fidelity["n_tokens"] > 0
        assert entry.tensor_count and entry.architecture == "llama" and entry.mtime_ns
        assert file_is_current(entry, outdir, str(entry.inputs_key))
    assert manifest.source_path == str(tiny_llama.resolve()) and manifest.source_files

    # The published form drops host paths and mtimes, and reads back through the same class.
    published = release_manifest(manifest, []).to_dict()
    assert "path" not in published["source"] and "mtime_ns" not in json.dumps(published)
    assert Manifest.from_dict(published).to_dict() == published

    # The job summary shows the time the pipeline recorded (keyed by runtime). Every file was measured, so the
    # fidelity worker verified each one in the same load and there is no separate verification time.
    assert manifest.seconds("verify_s") == {}
    fidelity = manifest.seconds("fidelity_s")
    assert set(fidelity) == {"all"} and fidelity["all"] > 0
    result = {"files": [e.to_dict() for e in manifest.files]}
    summary = job_summary.conversion_summary(result, manifest, title="m")
    line = "Verification and fidelity (one load of each new file: generate, then measure against the base)"
    assert f"{line}: {fidelity['all']:.1f} s." in summary

    # A no-work re-run reads the same record once and returns it unchanged.
    err = io.StringIO()
    (again,) = run_job(job, Output(stderr=err))
    assert "up to date" in err.getvalue() and again == manifest


# ------------------------------------------------------------------------------------------------ round trips


def test_a_minimal_document_round_trips_without_gaining_keys() -> None:
    manifest = Manifest.from_dict(GOOD)
    assert manifest.to_dict() == GOOD
    assert "imatrix" not in manifest.to_dict() and manifest.has("pair") and not manifest.has("imatrix")
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_explicit_nulls_stay_null_and_absent_keys_stay_absent() -> None:
    data = {**GOOD, "imatrix": None, "trained": None, "files": [{**ENTRY, "fidelity": None, "mtime_ns": 5}]}
    assert Manifest.from_dict(data).to_dict() == data


def test_a_manifest_built_in_code_writes_every_field() -> None:
    built = Manifest(model_name="m", files=[FileEntry(name="m.f16.gguf", precision="F16", bytes=1, sha256="0" * 64)])
    data = built.to_dict()
    assert data["imatrix"] is None and data["files"][0]["fidelity"] is None
    assert Manifest.from_dict(data) == built


def test_unknown_keys_of_a_newer_writer_survive_a_round_trip() -> None:
    fidelity = {
        "kld_mean": 0.01, "kld_mean_se": 0.001, "kld_median": 0.005, "kld_p99": 0.1, "kld_p99_9": 0.2,
        "kld_max": 0.5, "top1_agreement": 0.97, "top1_agreement_se": 0.01, "ppl_ratio": 1.01, "ppl_ratio_se": 0.002,
        "a_key_from_the_future": [1, 2],
    }  # fmt: skip
    data = {
        **GOOD,
        "request": {"values": {"FIDELITY": True}, "sources": {"FIDELITY": "cli"}},
        "options": {"future": True},
        "files": [{**ENTRY, "fidelity": fidelity, "signature": "m.q8_0.gguf.sigstore.json"}],
    }
    manifest = Manifest.from_dict(copy.deepcopy(data))
    assert manifest.extra == {"request": data["request"], "options": {"future": True}}
    assert manifest.files[0].extra == {"signature": "m.q8_0.gguf.sigstore.json"}
    assert manifest.files[0].fidelity == fidelity
    assert manifest.to_dict() == data


def test_a_published_manifest_with_checks_reads_through_the_same_class() -> None:
    data = {
        **GOOD,
        "source": {"kind": "local", "fingerprint": "f", "files": [{"path": "config.json", "bytes": 2, "sha256": "c"}]},
        "checks": {"CPU_LLM_LLAMA": {"pair": "CPU_LLM_LLAMA", "passed": True, "files": []}},
    }
    manifest = Manifest.from_dict(data)
    assert manifest.checks is not None and manifest.checks["CPU_LLM_LLAMA"]["passed"] is True
    assert manifest.to_dict() == data


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([GOOD], "expected a JSON object, found list"),
        ({**GOOD, "schema": 2}, "schema: expected 1, found 2"),
        ({**GOOD, "schema": True}, "schema: expected 1"),
        ({k: v for k, v in GOOD.items() if k != "schema"}, "schema: expected 1, found None"),
        ({**GOOD, "tool": "cecai"}, "tool: expected an object"),
        ({**GOOD, "toolchain": []}, "toolchain: expected an object"),
        ({**GOOD, "source": "hub"}, "source: expected an object"),
        ({**GOOD, "base": 1}, "base: expected an object"),
        ({**GOOD, "imatrix": "x.gguf"}, "imatrix: expected an object"),
        ({**GOOD, "imatrix": {"file": "../../../pwned.dat", "sha256": "0" * 64}}, "imatrix.file: '../../../pwned.dat'"),
        ({**GOOD, "imatrix": {"file": "/etc/passwd", "sha256": "0" * 64}}, "imatrix.file: '/etc/passwd' is a path"),
        ({**GOOD, "imatrix": {"file": None}}, "imatrix.file: expected a file name"),
        ({**GOOD, "timings": [1]}, "timings: expected an object"),
        ({**GOOD, "runtime": [1]}, "runtime: expected an object"),
        ({**GOOD, "checks": []}, "checks: expected an object"),
        ({**GOOD, "checks": {"CPU_LLM_LLAMA": True}}, "checks.CPU_LLM_LLAMA: expected an object"),
        ({**GOOD, "checks": {"CPU_LLM_LLAMA": {"runtime": "cpu"}}}, "checks.CPU_LLM_LLAMA.runtime: expected an object"),
        ({**GOOD, "checks": {"CPU_LLM_LLAMA": {"files": ["x.gguf"]}}}, "checks.CPU_LLM_LLAMA.files[0]: expected an"),
        ({**GOOD, "checks": {"CPU_LLM_LLAMA": {"pair": 1}}}, "checks.CPU_LLM_LLAMA.pair: expected a string"),
        ({**GOOD, "checks": {"CPU_LLM_LLAMA": {"passed": "yes"}}}, "checks.CPU_LLM_LLAMA.passed: expected true"),
        ({**GOOD, "request": "ab"}, "request: expected an object"),
        ({**GOOD, "request": {"values": "ab"}}, "request.values: expected an object"),
        ({**GOOD, "request": {"values": {"thresholds": ["Q8_0"]}}}, "request.values.thresholds: expected an object"),
        ({**GOOD, "request": {"values": {}, "sources": ["cli"]}}, "request.sources: expected an object"),
        ({**GOOD, "pair": 3}, "pair: expected a string"),
        ({**GOOD, "inputs_key": 3}, "inputs_key: expected a string"),
        ({**GOOD, "trained": "yes"}, "trained: expected true or false"),
        ({**GOOD, "model_name": "../../elsewhere"}, "model_name: '../../elsewhere' cannot be a file name stem"),
        ({**GOOD, "files": {"name": "x"}}, "files: expected a list"),
        ({**GOOD, "files": ["m.q8_0.gguf"]}, "files[0]: expected an object"),
        (with_entry(name="../../etc/passwd"), "files[0].name"),
        (with_entry(name=None), "files[0].name"),
        (with_entry(precision=8), "files[0].precision: missing or of the wrong type"),
        (with_entry(sha256=None), "files[0].sha256: missing or of the wrong type"),
        (with_entry(bytes="3"), "files[0].bytes: missing or of the wrong type"),
        (with_entry(bytes=True), "files[0].bytes: missing or of the wrong type"),
        (with_entry(mtime_ns=1.5), "files[0].mtime_ns: of the wrong type"),
        (with_entry(inputs_key=1), "files[0].inputs_key: of the wrong type"),
        (with_entry(tensor_count="75"), "files[0].tensor_count: of the wrong type"),
        (with_entry(architecture=1), "files[0].architecture: of the wrong type"),
        (with_entry(file_type="Q8_0"), "files[0].file_type: of the wrong type"),
        (with_entry(n_params=[]), "files[0].n_params: of the wrong type"),
        (with_entry(bpw="8.5"), "files[0].bpw: of the wrong type"),
        (with_entry(verification=[]), "files[0].verification: of the wrong type"),
        (with_entry(fidelity="good"), "files[0].fidelity: of the wrong type"),
        (with_entry(reused="no"), "files[0].reused: of the wrong type"),
        ({**GOOD, "source": {"path": 1}}, "source.path: expected a string"),
        ({**GOOD, "source": {"files": {}}}, "source.files: expected a list"),
        ({**GOOD, "source": {"files": [{"path": "a"}]}}, "source.files[0]: expected an object with path"),
        ({**GOOD, "source": {"files": [{"path": "a", "bytes": 1, "sha256": "s", "mtime_ns": "1"}]}}, "source.files[0]"),
    ],
)
def test_every_refusal_names_its_field(data: object, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(data)
    assert field in info.value.message
    assert isinstance(info.value, UsageError) and info.value.exit_code == EXIT_USAGE
    assert info.value.hint and "convert again" in info.value.hint


def test_load_manifest_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps(with_entry(bytes="3")))
    with pytest.raises(ManifestError, match=rf"^{tmp_path}/manifest\.json: files\[0\]\.bytes"):
        load_manifest(path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(path)
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "nowhere.json")


def test_read_manifest_treats_a_bad_one_as_no_record_and_warns(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None  # none at all: silently no record
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**GOOD, "runtime": [1]}))
    with logged("cecai.manifest") as records:
        assert read_manifest(tmp_path) is None
    (message,) = [r.getMessage() for r in records]
    assert f"ignoring {tmp_path / MANIFEST_NAME}: runtime: expected an object" in message
    assert "treated as having no record" in message


def test_write_manifest_refuses_what_readers_would_refuse_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"files\[0\]\.bytes"):
        write_manifest(tmp_path, {"model_name": "m", "files": [{**ENTRY, "bytes": "3"}]})
    assert list(tmp_path.iterdir()) == []
    written = write_manifest(tmp_path, {"model_name": "m", "files": [ENTRY]})
    assert written.path == tmp_path / MANIFEST_NAME and written.tool and written.tool["name"] == "cecai-converter"
    assert load_manifest(tmp_path / MANIFEST_NAME) == written


# ------------------------------------------------------------------------------------------- any JSON at all

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["schema", "pair", "model_name", "trained", "source", "files", "timings", "runtime", "checks", "imatrix", "x"]
)
ENTRY_KEYS = st.sampled_from([*ENTRY, "mtime_ns", "bpw", "fidelity", "verification", "reused", "tensor_count", "y"])


@st.composite
def near_valid(draw: st.DrawFn) -> object:
    """GOOD with one top-level value and one file value replaced by any JSON."""
    data: dict[str, Any] = copy.deepcopy(GOOD)
    data[draw(KEYS)] = draw(JSON)
    if isinstance(data.get("files"), list) and data["files"] and isinstance(data["files"][0], dict):
        data["files"][0][draw(ENTRY_KEYS)] = draw(JSON)
    return data


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON, near_valid()))
def test_any_json_is_refused_with_a_field_or_round_trips(data: object) -> None:
    try:
        manifest = Manifest.from_dict(copy.deepcopy(data))
    except ManifestError as exc:
        assert exc.message and exc.exit_code == EXIT_USAGE
        return
    assert manifest.to_dict() == data
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_the_published_request_names_files_without_the_builders_folders() -> None:
    from cecai_converter.release.manifests import release_manifest

    request = {
        "values": {"eval_text": "/home/builder/secret/eval.txt", "imatrix": "/srv/x/m.imatrix.gguf", "threads": 4},
        "sources": {"eval_text": "cli", "imatrix": "yaml", "threads": "default"},
    }
    manifest = Manifest.from_dict({**GOOD, "request": request})
    published = release_manifest(manifest, []).to_dict()
    assert published["request"]["values"] == {"eval_text": "eval.txt", "imatrix": "m.imatrix.gguf", "threads": 4}
    assert published["request"]["sources"] == request["sources"]
    assert "/home/builder" not in json.dumps(published)
    assert manifest.to_dict()["request"] == request  # the builder's own record is untouched
