"""Untrusted inputs, second pass (issue 16): deep JSON, huge YAML integers, a hostile reference.json, thresholds and
``--n-gpu-layers`` out of range. Each is refused before any work, as an input error (exit 2) that names the file,
variable or field; never a traceback, never a made-up result.

Everything runs through the real CLI entry (``cli.main``, in process) on real files: a builder's outputs folder is
a real ``manifest.json``, a real GGUF file written by the ``gguf`` library and a ``reference.json``, so no case
needs a conversion. Each test fails on the code before the fix (a traceback, an exit 1 "this runtime could not
evaluate the file", or a value accepted).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tree_digest
from gguf import GGUFWriter

from cecai_converter import cli, gha
from cecai_converter.agreement import N_POSITIONS, REFERENCE_NAME, TOP_K, check_reference_fits, read_reference
from cecai_converter.errors import EXIT_USAGE, BadReference
from cecai_converter.fsutil import sha256_file
from cecai_converter.manifest import MANIFEST_NAME

DEEP = "[" * 20_000  # far past Python's recursion limit: json.loads raises RecursionError on it


def run(argv: Sequence[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``cecai-convert ARGV`` in process: (exit code, stderr). argparse's refusals exit through SystemExit."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # a flag's type refused the value: argparse's usage error, exit 2
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# ---------------------------------------------------------------------------------------- a builder's folder

VOCAB = 64  # tokens in the test GGUF's vocabulary


def write_gguf(path: Path, *, n_vocab: int = VOCAB, context_length: int | None = None) -> Path:
    """A real GGUF header and data: architecture llama, a zero ``token_embd.weight`` of ``n_vocab`` rows."""
    writer = GGUFWriter(str(path), arch="llama")
    if context_length is not None:
        writer.add_context_length(context_length)
    writer.add_tensor("token_embd.weight", np.zeros((n_vocab, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def good_reference(name: str, *, n_tokens: int = 16, width: int = TOP_K) -> dict[str, Any]:
    """A reference as the builder writes it: tokens, one row of ``width`` ids and decreasing log-probs per token."""
    return {
        "schema": 1,
        "tokens": [1 + i % (VOCAB - 1) for i in range(n_tokens)],
        "top_k": TOP_K,
        "runtime": {"device": "cpu"},
        "files": {
            name: {
                "ids": [list(range(width)) for _ in range(n_tokens)],
                "logprobs": [[round(-4.0 - 0.1 * j, 6) for j in range(width)] for _ in range(n_tokens)],
            }
        },
    }


def outputs_folder(root: Path, *, context_length: int | None = None) -> tuple[Path, str]:
    """A builder's outputs folder: one GGUF file, its manifest.json and a good reference.json."""
    folder = root / "out"
    folder.mkdir(parents=True)
    name = "tiny.q8_0.gguf"
    gguf = write_gguf(folder / name, context_length=context_length)
    digest = sha256_file(gguf)
    entry = {"name": name, "precision": "Q8_0", "bytes": gguf.stat().st_size, "sha256": digest}
    (folder / MANIFEST_NAME).write_text(json.dumps({"schema": 1, "model_name": "tiny", "pair": None, "files": [entry]}))
    reference = good_reference(name)
    reference["files"][name]["sha256"] = digest
    (folder / REFERENCE_NAME).write_text(json.dumps(reference))
    return folder, name


def check_refuses(folder: Path, capsys: pytest.CaptureFixture[str], *phrases: str) -> str:
    """``check FOLDER --pair cpu`` ends with exit 2 naming each phrase, quickly, and writes no record."""
    before = tree_digest(folder)
    start = time.monotonic()
    code, err = run(["check", folder, "--pair", "cpu"], capsys)
    assert code == EXIT_USAGE, err
    for phrase in phrases:
        assert phrase in err, err
    assert "could not evaluate" not in err
    assert time.monotonic() - start < 30  # refused before any file is loaded
    assert tree_digest(folder) == before  # no check record: nothing was measured
    return err


def edit_reference(folder: Path, change: Any) -> None:
    data = json.loads((folder / REFERENCE_NAME).read_text())
    change(data)
    (folder / REFERENCE_NAME).write_text(json.dumps(data))


# ------------------------------------------------------------------------ root cause 2: deep JSON, one reader


def test_deep_json_in_cecai_request_is_refused_naming_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CECAI_REQUEST", DEEP)
    (tmp_path / "model").mkdir()
    code, err = run(["convert", tmp_path / "model", "--precision", "Q8_0", "--outdir", tmp_path / "out",
                     "--request", "env:CECAI_REQUEST"], capsys)  # fmt: skip
    assert code == EXIT_USAGE
    assert "--request env:CECAI_REQUEST: JSON nested more than 64 levels deep" in err


def test_deep_json_in_a_request_file_is_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "request.json"
    request.write_text('{"values": ' + DEEP)
    (tmp_path / "model").mkdir()
    code, err = run(["convert", tmp_path / "model", "--precision", "Q8_0", "--outdir", tmp_path / "out",
                     "--request", request], capsys)  # fmt: skip
    assert code == EXIT_USAGE
    assert f"--request {request}: JSON nested" in err


def test_deep_json_in_thresholds_flag_and_variable_is_refused_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model").mkdir()
    argv = ["convert", tmp_path / "model", "--precision", "Q8_0", "--outdir", tmp_path / "out"]
    code, err = run([*argv, "--thresholds", DEEP], capsys)
    assert code == EXIT_USAGE and "JSON nested more than 64 levels deep" in err and "--thresholds" in err
    monkeypatch.setenv("CECAI_THRESHOLDS", DEEP)
    code, err = run(argv, capsys)
    assert code == EXIT_USAGE and "CECAI_THRESHOLDS: JSON nested more than 64 levels deep" in err


def test_deep_json_in_reference_json_is_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = outputs_folder(tmp_path)
    (folder / REFERENCE_NAME).write_text(DEEP)
    check_refuses(folder, capsys, f"{folder / REFERENCE_NAME}: JSON nested more than 64 levels deep")


def test_deep_json_in_a_check_record_is_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "tiny.cpu_llm_llama.check.json"
    record.write_text('{"schema": 1, "files": ' + DEEP)
    code, err = run(["card", tmp_path, "--checks", record], capsys)
    assert code == EXIT_USAGE
    assert f"check record {record}: JSON nested more than 64 levels deep" in err


def test_deep_json_in_the_publish_actions_expected_checks_is_refused(tmp_path: Path) -> None:
    (tmp_path / "summary.md").touch()
    (tmp_path / "output").touch()
    env = {
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "INPUT_PATH": str(tmp_path / "summary.md"),
        "INPUT_EXPECTED_CHECKS": '{"include": ' + DEEP,
        "INPUT_TAG": "v1",
    }
    stdout = io.StringIO()
    assert gha.main(["publish"], env=env, stdout=stdout) == EXIT_USAGE
    assert "the `expected-checks` input: JSON nested more than 64 levels deep" in stdout.getvalue()


# ------------------------------------------------------------------------------- root cause 3: huge integers

HUGE = "9" * 5000  # past Python's 4,300-digit limit: PyYAML's int() raises ValueError


def test_huge_yaml_int_in_a_converter_folder_is_a_config_error_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "Converter" / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text(f"MODEL_NAME: m\nTHREADS: {HUGE}\n")
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: Q8_0\n")
    code, err = run(["run", tmp_path / "Converter"], capsys)
    assert code == EXIT_USAGE
    assert str(cfg / "converter_args.yaml") in err and "'THREADS': an integer of 5,000 characters" in err


def test_huge_yaml_int_in_a_hex_value_is_refused_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """0x… of 5,000 digits parses (no digit limit for hexadecimal) but could never be shown in a message."""
    cfg = tmp_path / "Converter" / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text(f"MODEL_NAME: m\nN_GPU_LAYERS: 0x{'f' * 5000}\n")
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: Q8_0\n")
    code, err = run(["run", tmp_path / "Converter"], capsys)
    assert code == EXIT_USAGE and "'N_GPU_LAYERS': an integer of 5,002 characters" in err


def test_huge_yaml_int_in_a_batch_file_is_a_config_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = tmp_path / "conversions.yaml"
    batch.write_text(f"models:\n  - repo: o/m\n    revision: {HUGE}\n    precisions: [Q8_0]\n")
    code, err = run(["plan", batch], capsys)
    assert code == EXIT_USAGE
    assert str(batch) in err and "'revision': an integer of 5,000 characters" in err


@pytest.mark.parametrize("key", ["OUTPUTS_PATH", "EVAL_TEXT"])
def test_nul_in_a_yaml_file_name_is_a_config_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """Found by the fuzzer: a NUL in a path key was Python's `ValueError: embedded null byte`, a traceback."""
    cfg = tmp_path / "Converter" / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text(f'MODEL_NAME: m\n{key}: "out\\0put"\n')
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: Q8_0\n")
    code, err = run(["run", tmp_path / "Converter"], capsys)
    assert code == EXIT_USAGE and f"{key}" in err and "holds the control character U+0000" in err


def test_huge_json_int_in_a_request_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CECAI_THRESHOLDS", '{"Q8_0": {"max_kld": ' + HUGE + "}}")
    (tmp_path / "model").mkdir()
    code, err = run(["convert", tmp_path / "model", "--precision", "Q8_0", "--outdir", tmp_path / "out"], capsys)
    assert code == EXIT_USAGE and "CECAI_THRESHOLDS: a number with more digits than this tool reads" in err


# ---------------------------------------------------------------------- root cause 4: reference.json is trusted


def test_reference_json_as_the_builder_writes_it_is_accepted(tmp_path: Path) -> None:
    folder, name = outputs_folder(tmp_path)
    reference = read_reference(folder / REFERENCE_NAME)
    check_reference_fits(reference, name, folder / name)  # the file's vocabulary holds every id
    # A vocabulary smaller than top-k: the builder keeps every token of it.
    small = write_gguf(tmp_path / "small.gguf", n_vocab=20)
    narrow = good_reference("small.gguf", width=20)
    narrow["tokens"] = [t % 20 for t in narrow["tokens"]]
    check_reference_fits(narrow, "small.gguf", small)


def test_reference_json_negative_token_id_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative id indexes from the end of the vocabulary: a made-up KL-divergence, not an error, before."""
    folder, name = outputs_folder(tmp_path)
    edit_reference(folder, lambda d: d["files"][name]["ids"][3].__setitem__(0, -1))
    check_refuses(folder, capsys, f"files['{name}'].ids[3][0]: expected a token id (a whole number ≥ 0), got -1")


def test_reference_json_negative_input_token_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = outputs_folder(tmp_path)
    edit_reference(folder, lambda d: d["tokens"].__setitem__(2, -5))
    check_refuses(folder, capsys, "tokens[2]: expected a token id")


def test_reference_json_token_outside_the_files_vocabulary_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, name = outputs_folder(tmp_path)
    edit_reference(folder, lambda d: d["files"][name]["ids"][0].__setitem__(5, VOCAB + 7))
    check_refuses(folder, capsys, f"files['{name}'].ids[0][5]: token {VOCAB + 7} is not in {name}'s vocabulary")
    folder2, _ = outputs_folder(tmp_path / "2")
    edit_reference(folder2, lambda d: d["tokens"].__setitem__(0, 10_000))
    check_refuses(folder2, capsys, f"tokens[0]: token 10000 is not in {name}'s vocabulary ({VOCAB} tokens)")


@pytest.mark.parametrize(
    ("value", "shown"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (0.5, "0.5"), ("x", "'x'")]
)
def test_reference_json_logprob_out_of_range_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: object, shown: str
) -> None:
    folder, name = outputs_folder(tmp_path)
    edit_reference(folder, lambda d: d["files"][name]["logprobs"][1].__setitem__(0, value))
    check_refuses(folder, capsys, f"files['{name}'].logprobs[1][0]: expected a log-probability (finite, ≤ 0)", shown)


def test_reference_json_rows_of_another_length_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, name = outputs_folder(tmp_path)

    def widen(d: dict[str, Any]) -> None:
        d["files"][name]["ids"][4] = list(range(TOP_K + 1))
        d["files"][name]["logprobs"][4] = [-5.0] * (TOP_K + 1)

    edit_reference(folder, widen)
    check_refuses(folder, capsys, f"files['{name}'].ids[4]: {TOP_K + 1} ids where the rows before have {TOP_K}")
    # Every row narrower than the builder keeps for this vocabulary: a top-1 against another top-k.
    folder2, _ = outputs_folder(tmp_path / "2")
    edit_reference(folder2, lambda d: d["files"][name].update(ids=[[0]] * 16, logprobs=[[-0.1]] * 16))
    check_refuses(folder2, capsys, f"files['{name}'].ids[0]: 1 ids; the builder keeps {TOP_K} for this file")


def test_reference_json_probabilities_summing_past_one_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, name = outputs_folder(tmp_path)
    edit_reference(folder, lambda d: d["files"][name]["logprobs"].__setitem__(0, [-0.01] * TOP_K))
    check_refuses(folder, capsys, f"files['{name}'].logprobs[0]: the probabilities sum to")


def test_reference_json_more_tokens_than_the_builder_writes_is_refused_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: a 1.2 MB reference ran for minutes at 1.6 GB; the worker's work grows with the tokens."""
    folder, name = outputs_folder(tmp_path)
    n = 5000
    big = good_reference(name, n_tokens=n, width=4)
    big["top_k"] = 4
    (folder / REFERENCE_NAME).write_text(json.dumps(big))
    check_refuses(folder, capsys, f"tokens: {n} tokens; the builder writes 8 to {N_POSITIONS}")


def test_reference_json_more_tokens_than_the_trained_context_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, name = outputs_folder(tmp_path, context_length=12)
    check_refuses(folder, capsys, f"tokens: 16 tokens, more than {name}'s trained context (12)")


def test_reference_json_top_k_wider_than_the_builder_keeps_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = outputs_folder(tmp_path)
    edit_reference(folder, lambda d: d.update(top_k=100_000))
    check_refuses(folder, capsys, f"top_k: expected a whole number from 1 to {TOP_K}")


def test_reference_json_larger_than_the_bound_is_refused_before_parsing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = outputs_folder(tmp_path)
    text = (folder / REFERENCE_NAME).read_text()
    (folder / REFERENCE_NAME).write_text(text + " " * (17 * 1024 * 1024))  # still valid JSON
    check_refuses(folder, capsys, "more than the 16,777,216 accepted")


def test_reference_json_errors_are_input_errors_not_runtime_failures(tmp_path: Path) -> None:
    folder, name = outputs_folder(tmp_path)
    edit_reference(folder, lambda d: d["files"][name]["ids"][0].__setitem__(0, True))
    with pytest.raises(BadReference) as info:
        read_reference(folder / REFERENCE_NAME)
    assert info.value.exit_code == EXIT_USAGE and info.value.hint and "convert again" in info.value.hint


# ---------------------------------------------------------------------------- root cause 11: threshold ranges


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"min_top1": 5}, "Q8_0.min_top1 must be between 0 and 1, got 5"),
        ({"min_top1": -0.1}, "Q8_0.min_top1 must be between 0 and 1"),
        ({"max_kld": -1}, "Q8_0.max_kld must be a number ≥ 0, got -1"),
        ({"max_ppl_delta_pct": -5}, "Q8_0.max_ppl_delta_pct must be a number ≥ 0"),
        ({"max_kld": 10**400}, "Q8_0.max_kld must be a number ≥ 0"),
    ],
)
def test_threshold_range_is_checked_with_the_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], limits: dict[str, Any], message: str
) -> None:
    cfg = tmp_path / "Converter" / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text(json.dumps({"MODEL_NAME": "m", "THRESHOLDS": {"Q8_0": limits}}))
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: Q8_0\n")
    code, err = run(["run", tmp_path / "Converter"], capsys)
    assert code == EXIT_USAGE
    assert str(cfg / "converter_args.yaml") in err and message in err


def test_threshold_range_is_checked_for_the_flag_and_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model").mkdir()
    argv = ["convert", tmp_path / "model", "--precision", "Q8_0", "--outdir", tmp_path / "out"]
    code, err = run([*argv, "--thresholds", '{"Q8_0": {"min_top1": 90}}'], capsys)
    assert code == EXIT_USAGE and "min_top1 must be between 0 and 1, got 90" in err
    monkeypatch.setenv("CECAI_THRESHOLDS", '{"q4_k_m": {"max_kld": -0.5}}')
    code, err = run(argv, capsys)
    assert code == EXIT_USAGE and "CECAI_THRESHOLDS: Q4_K_M.max_kld must be a number ≥ 0, got -0.5" in err
    # check's limits follow the same rule (one range per limit, fidelity.THRESHOLD_RANGES)
    for flag, value, message in [
        ("--min-top1", "5", "--min-top1 must be between 0 and 1"),
        ("--max-kld", "-1", "--max-kld must be a number ≥ 0"),
        ("--max-kld", "nan", "--max-kld must be a number ≥ 0"),
    ]:
        code, err = run(["check", tmp_path, "--pair", "cpu", flag, value], capsys)
        assert code == EXIT_USAGE and message in err


# ----------------------------------------------------------------------------------- --n-gpu-layers range


def test_n_gpu_layers_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ctypes wraps a value past 32 bits silently (1e20 offloads a garbage count); below -1 means nothing."""
    huge = "100000000000000000000"
    (tmp_path / "model").mkdir()
    convert = ["convert", tmp_path / "model", "--precision", "Q8_0", "--outdir", tmp_path / "out"]
    for argv in (
        ["check", tmp_path, "--pair", "cpu", "--n-gpu-layers", huge],
        ["verify", tmp_path / "x.gguf", "--n-gpu-layers", "-2"],
        [*convert, "--n-gpu-layers", huge],
    ):
        code, err = run(argv, capsys)
        assert code == EXIT_USAGE and "give -1 (all layers), 0 (CPU only) or a count up to 100,000" in err, argv
    monkeypatch.setenv("CECAI_N_GPU_LAYERS", "-7")
    code, err = run(convert, capsys)
    assert code == EXIT_USAGE and "CECAI_N_GPU_LAYERS: -7 layers: give -1" in err
    monkeypatch.delenv("CECAI_N_GPU_LAYERS")
    cfg = tmp_path / "Converter" / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text(f"MODEL_NAME: m\nN_GPU_LAYERS: {huge}\n")
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text("PRECISION: Q8_0\n")
    code, err = run(["run", tmp_path / "Converter"], capsys)
    assert code == EXIT_USAGE and "N_GPU_LAYERS" in err and "give -1 (all layers)" in err
