"""The typed readings of a check record's objects and of the manifest fields a check and a release read.

``records.Agreement``, ``CheckRuntime`` and ``ShownImage`` (a row's ``agreement`` and ``image``, a record's
``runtime``), ``Manifest.request_values`` and the shipped base (``base_record.file``/``sha256``), and
``manifest_fields.ListedFile`` (``convert --json``'s file rows): each read from what the real writers write, kept
byte for byte by ``to_dict``, lenient where a field is absent or of another type; and the outputs made from them (the
job summary, the release notes' checks table, the check's own report, the published manifest's ``measured_by``)
exactly as the dict readings wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cecai_converter import agreement, job_summary
from cecai_converter.check import _human
from cecai_converter.errors import ManifestError
from cecai_converter.manifest import Manifest
from cecai_converter.manifest_fields import Base, ListedFile, RequestValues, read_fields
from cecai_converter.multimodal import ImageCheck
from cecai_converter.records import Agreement, CheckRecord, CheckRow, CheckRuntime, ShownImage
from cecai_converter.release.manifests import release_manifest
from cecai_converter.release.notes import checks_table
from cecai_converter.request import resolve

SHA = "ab" * 32
#: As ``agreement.Agreement.as_dict`` writes it (the check's writer).
AGREEMENT = agreement.Agreement(
    kld_mean=0.000123, kld_max=0.002, top1_agreement=0.995, n_positions=128, prompt_tps=1523.374, gen_tps=88.6129,
    peak_rss_mib=812.54, offloaded_layers=29, total_layers=29,
).as_dict()  # fmt: skip
IMAGE = {
    **ImageCheck(runtime="cpu", mmproj="mmproj-m-f16.gguf", image="test.png", prompt="What is this?", image_tokens=64,
                 embedding_values=4096, embedding_rms=0.5, generated_tokens=[1, 2, 3], text="a cat").as_dict(),
    "model": "m.q8_0.gguf",
}  # fmt: skip
RUNTIME = {"device": "cuda", "machine": "x86_64", "llama_cpp_python": "0.3.16", "gpu_offload": True,
           "n_gpu_layers": -1, "backend": "docker", "image": "ghcr.io/o/cecai:gpu"}  # fmt: skip


def _record() -> dict[str, Any]:
    """A record as `cecai-convert check` writes one: a text file, a projector file, and a file of other bytes."""
    return {
        "schema": 1, "pair": "GPU_LLM_LLAMA", "passed": False, "runtime": RUNTIME, "problems": [],
        "files": [
            {"name": "m.q8_0.gguf", "precision": "Q8_0", "sha256": SHA, "sha256_match": True, "problems": [],
             "generated_tokens": 8, "agreement": AGREEMENT, "passed": True},
            {"name": "mmproj-m-f16.gguf", "precision": "F16", "role": "mmproj", "sha256": SHA, "sha256_match": True,
             "problems": [], "image": IMAGE, "passed": True},
            {"name": "m.q4.gguf", "precision": "Q4_K_M", "sha256": "cd" * 32, "sha256_match": False,
             "problems": ["sha256 differs"], "passed": False},
        ],
    }  # fmt: skip


def test_a_rows_agreement_and_image_read_typed_and_the_record_round_trips_byte_for_byte() -> None:
    data = _record()
    record = CheckRecord.from_dict(data)
    text, projector, other = record.rows
    assert text.agreement_record == Agreement(
        kld_mean=0.000123, kld_max=0.002, top1_agreement=0.995, n_positions=128, prompt_tps=1523.37, gen_tps=88.61,
        peak_rss_mib=812.5, offloaded_layers=29, total_layers=29,
    )  # fmt: skip
    assert text.image_record is None and other.agreement_record is None and other.image_record is None
    image = projector.image_record
    assert image == ShownImage(runtime="cpu", mmproj="mmproj-m-f16.gguf", image="test.png", prompt="What is this?",
                               image_tokens=64, embedding_values=4096, embedding_rms=0.5, generated_tokens=(1, 2, 3),
                               text="a cat", model="m.q8_0.gguf")  # fmt: skip
    assert record.runtime_record == CheckRuntime(**RUNTIME)
    # the readings are views: the record is written back exactly as it was read
    assert json.dumps(record.to_dict()) == json.dumps(data)


def test_the_readings_are_lenient_where_a_field_is_absent_or_of_another_type() -> None:
    assert CheckRow.from_dict({"name": "x"}).agreement_record is None
    assert CheckRow.from_dict({"agreement": {}}).agreement_record is None  # an empty agreement is none
    assert CheckRow.from_dict({"agreement": [1, 2]}).agreement_record is None
    odd = CheckRow.from_dict({"agreement": {"gen_tps": "fast", "kld_mean": True, "offloaded_layers": 2.5,
                                            "top1_agreement": 1, "peak_rss_mib": float("inf")}})  # fmt: skip
    assert odd.agreement_record == Agreement(top1_agreement=1.0, peak_rss_mib=float("inf"))
    assert CheckRow.from_dict({"image": {"generated_tokens": [1, "x", 2]}}).image_record == ShownImage(
        generated_tokens=(1, 2)
    )
    assert CheckRow.from_dict({"fidelity": {"device": "cuda", "kld_mean": 0.5}}).fidelity_record is not None
    assert CheckRow.from_dict({"fidelity": "measured"}).fidelity_record is None
    assert CheckRecord.from_dict({"pair": "CPU_LLM_LLAMA"}).runtime_record == CheckRuntime()
    assert CheckRecord.from_dict({"runtime": {"device": 5, "backend": "local"}}).runtime_record == CheckRuntime(
        backend="local"
    )


def test_the_manifest_reads_the_recorded_request_and_the_shipped_base() -> None:
    request = resolve(
        {"fidelity_target": 0.05, "fidelity_tokens": "all"}, {"THRESHOLDS": {"Q8_0": {"max_kld": 0.1}}}, {},
        command="convert",
    ).record()  # fmt: skip
    base = {"precision": "F16", "kept": False, "file": "m.f16.gguf", "sha256": SHA}
    manifest = Manifest.from_dict({"schema": 1, "request": request, "base": base, "fidelity_on": "check"})
    values = manifest.request_values
    assert values.fidelity_target == 0.05 and values.fidelity_tokens == "all" and values.eval_text is None
    assert values.thresholds == {"Q8_0": {"max_kld": 0.1}}
    assert manifest.request == request and manifest.request is manifest.extra["request"]
    assert manifest.base_record == Base(precision="F16", kept=False, file="m.f16.gguf", sha256=SHA)
    assert json.dumps(manifest.to_dict()) == json.dumps(
        {"schema": 1, "base": base, "fidelity_on": "check", "request": request}
    )
    # a run that recorded no request (an older writer), or no base shipped: nothing read
    bare = Manifest.from_dict({"schema": 1, "base": {"precision": "F16", "kept": True}})
    assert bare.request is None and bare.request_values == RequestValues()
    assert bare.base_record.file is None and bare.base_record.sha256 is None
    odd = Manifest.from_dict({"schema": 1, "request": {"values": {"fidelity_target": "0.1", "eval_text": 3}}})
    assert odd.request_values == RequestValues()
    # thresholds a check applies are refused when malformed, never read as none
    with pytest.raises(ManifestError, match=r"request\.values\.thresholds: expected an object"):
        Manifest.from_dict({"schema": 1, "request": {"values": {"thresholds": [1]}}})


def test_convert_json_rows_read_as_listed_files() -> None:
    row = {"name": "mmproj-m-f16.gguf", "precision": "F16", "role": "mmproj", "bytes": 3, "sha256": SHA,
           "path": "/o/mmproj-m-f16.gguf", "verification": {"runtime": "cpu"}}  # fmt: skip
    assert read_fields(ListedFile, row) == ListedFile("mmproj-m-f16.gguf", "F16", "mmproj", 3, SHA)
    assert read_fields(ListedFile, {"name": "a"}) == ListedFile(name="a")


# -- the outputs, byte for byte as the dict readings wrote them (rendered by the code before the typed readings)


def test_the_job_summary_of_a_check_is_unchanged() -> None:
    assert job_summary.check_summary(_record()) == SUMMARY
    row = {"name": "m.q8_0.gguf", "sha256": SHA, "passed": True, "agreement": {"gen_tps": 5.5}}
    partial = {"pair": "CPU_LLM_LLAMA", "runtime": {"device": "cpu"}, "files": [row]}
    assert job_summary.check_summary(partial) == SUMMARY_PARTIAL


def test_the_job_summary_of_a_conversion_is_unchanged() -> None:
    result = {"files": [
        {"name": "m.q8_0.gguf", "precision": "Q8_0", "bytes": 1_500_000, "sha256": SHA, "path": "/o/m.q8_0.gguf"},
        {"name": "mmproj-m-f16.gguf", "precision": "F16", "role": "mmproj", "bytes": 2_000_000_000,
         "sha256": "cd" * 32},
        {"name": "a|b`<x>.gguf", "precision": "Q4_K_M"},
    ]}  # fmt: skip
    timings = {"convert_s": 2.0, "quantize_s": {"Q4_K_M": 3.0}, "mmproj_s": {"F16": 1.25}, "total_s": 9}
    manifest = Manifest.from_dict({"schema": 1, "timings": timings})
    assert job_summary.conversion_summary(result, manifest, title="m (CPU)") == CONVERSION


def test_the_release_notes_checks_table_is_unchanged() -> None:
    files = [{"name": "m.q8_0.gguf", "precision": "Q8_0", "bytes": 3, "sha256": SHA},
             {"name": "m.q4.gguf", "precision": "Q4_K_M", "bytes": 3, "sha256": "cd" * 32}]  # fmt: skip
    checks = {"GPU_LLM_LLAMA": _record()}
    manifest = Manifest.from_dict({"schema": 1, "model_name": "m", "files": files, "checks": checks})
    assert "\n".join(checks_table({"m": manifest})) == NOTES


def test_the_checks_own_report_is_unchanged() -> None:
    assert _human(CheckRecord.from_dict(_record()), Path("/r/m.check.json")) == HUMAN


def test_the_published_fidelity_names_the_device_its_row_names_else_the_records_runtime() -> None:
    files = [{"name": "m.q8_0.gguf", "precision": "Q8_0", "bytes": 3, "sha256": SHA},
             {"name": "m.q4.gguf", "precision": "Q4_K_M", "bytes": 3, "sha256": "cd" * 32}]  # fmt: skip
    builder = Manifest.from_dict({
        "schema": 1, "model_name": "m", "fidelity_on": "check", "files": files,
        "source": {"kind": "local", "path": "/home/b/m", "fingerprint": "f",
                   "files": [{"path": "config.json", "bytes": 2, "mtime_ns": 5, "sha256": SHA}]},
        "request": {"values": {"eval_text": "/home/b/eval.txt", "threads": 4}, "sources": {"eval_text": "cli"}},
    })  # fmt: skip
    record = {"pair": "GPU_LLM_LLAMA", "runtime": {"device": "cuda"}, "files": [
        {"name": "m.q8_0.gguf", "sha256": SHA, "passed": True, "fidelity": {"kld_mean": 0.01, "device": "cpu"}},
        {"name": "m.q4.gguf", "sha256": "cd" * 32, "passed": True, "fidelity": {"kld_mean": 0.02}},
    ]}  # fmt: skip
    published = release_manifest(builder, [record]).to_dict()
    assert [f["fidelity"]["measured_by"] for f in published["files"]] == [
        {"pair": "GPU_LLM_LLAMA", "device": "cpu"},
        {"pair": "GPU_LLM_LLAMA", "device": "cuda"},
    ]
    assert published["source"] == {"kind": "local", "fingerprint": "f",
                                   "files": [{"path": "config.json", "bytes": 2, "sha256": SHA}]}  # fmt: skip
    assert published["request"]["values"]["eval_text"] == "eval.txt"
    no_runtime = release_manifest(builder, [{**record, "runtime": {}}]).to_dict()
    assert no_runtime["files"][1]["fidelity"]["measured_by"] == {"pair": "GPU_LLM_LLAMA", "device": "None"}
    hub = release_manifest(Manifest.from_dict({"schema": 1, "source": {"kind": "hub", "path": "x"}}), []).to_dict()
    assert hub["source"] == {"kind": "hub", "path": "x"}  # only a local source's path is the builder's


# Rendered by the dict readings (the code before the typed readings) from the same inputs.
SUMMARY = (
    "### Check GPU_LLM_LLAMA: ❌ failed\n"
    "\n"
    "Runtime: cuda on x86_64, llama-cpp-python 0\\.3.16, backend docker, image `ghcr.io/o/cecai:gpu`\n"
    "\n"
    "| File | SHA-256 | KLD vs builder | Top-1 | Prompt tok/s | Gen tok/s | Peak memory | GPU layers | Result |\n"
    "| --- | --- | --: | --: | --: | --: | --: | --: | --- |\n"
    "| `m.q8_0.gguf` | match | 1.23e-04 | 99.5% | 1523 | 89 | 852.0 MB | 29/29 | ok |\n"
    "| `mmproj-m-f16.gguf` | match |  |  |  |  |  | / | ok |\n"
    "| `m.q4.gguf` | **differs** |  |  |  |  |  | / | sha256 differs |\n"
    "\n"
)
SUMMARY_PARTIAL = (
    "### Check CPU_LLM_LLAMA: ❌ failed\n"
    "\n"
    "Runtime: cpu on None, llama-cpp-python None, backend None\n"
    "\n"
    "| File | SHA-256 | KLD vs builder | Top-1 | Prompt tok/s | Gen tok/s | Peak memory | GPU layers | Result |\n"
    "| --- | --- | --: | --: | --: | --: | --: | --: | --- |\n"
    "| `m.q8_0.gguf` | **differs** |  |  |  | 6 |  | / | ok |\n"
    "\n"
)
CONVERSION = (
    "### m (CPU)\n"
    "\n"
    "| File | Precision | Size | SHA-256 | Time |\n"
    "| --- | --- | ---: | --- | ---: |\n"
    "| `m.q8_0.gguf` | Q8_0 | 1.5 MB | `abababababab` | 2.0 s |\n"
    "| `mmproj-m-f16.gguf` | mmproj F16 | 2.0 GB | `cdcdcdcdcdcd` | 1.2 s |\n"
    "| ``a\\|b`<x>.gguf`` | Q4_K_M | 0 B |  | 3.0 s |\n"
    "\n"
    "Total: 9.0 s.\n"
    "\n"
)
NOTES = (
    "#### Checked on each pair's runtime: m\n"
    "\n"
    "Runtimes: GPU_LLM_LLAMA: cuda on x86_64.\n"
    "\n"
    "| File | GPU_LLM_LLAMA |\n"
    "| --- | --- |\n"
    "| `m.q8_0.gguf` | ✅ 89 tok/s · KLD 1.2e-04 · top-1 100% |\n"
    "| `m.q4.gguf` | ❌ sha256 differs |\n"
    "\n"
    "KLD and top-1: agreement of the pair's runtime with the builder's on the same file (0 and "
    "100% = identical predictions); tok/s: generation speed on the pair's runner.\n"
)
HUMAN = (
    "GPU_LLM_LLAMA: FAILED on cuda (x86_64, llama-cpp-python 0.3.16, backend docker) — record /r/m.check.json\n"
    "  ok   m.q8_0.gguf                          sha256 abababababab  kld 1.23e-04 (max "
    "2.00e-03) top-1 99.5% prompt 1523 tok/s gen 89 tok/s peak 852.0 MB offloaded 29/29\n"
    "  ok   mmproj-m-f16.gguf                    sha256 abababababab  test image: 64 image "
    "tokens, 3 tokens generated (with m.q8_0.gguf)\n"
    "  FAIL m.q4.gguf                            sha256 cdcdcdcdcdcd  no measurement\n"
    "       sha256 differs"
)
