"""Fidelity numbers on a small real model: computed, finite, sensibly ordered; thresholds; failures explained."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
from conftest import convert_to_f32, require_module

from cecai_converter import fidelity
from cecai_converter.errors import ConfigError, ConverterError
from cecai_converter.fidelity import MeasurementFailed, check_thresholds, measure, measurement

QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")


def quantize(src: Path, dst: Path, precision: str, imatrix_data: object = None) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{precision}")
    params.nthread = 2
    if imatrix_data is not None:
        imatrix_data.apply(params)  # type: ignore[attr-defined]
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params))


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama (SentencePiece tokenizer) as F32 GGUF and three quantizations of it."""
    require_module("llama", "llama_cpp")
    require_module("torch", "torch")
    from cecai_converter.modelgen import build_model

    root = tmp_path_factory.mktemp("fidelity")
    base = convert_to_f32(build_model(root / "hf", "llama", seed=1), root / "tiny.f32.gguf")
    files = {"F32": base}
    for precision in QUANTS:
        dst = root / f"tiny.{precision.lower()}.gguf"
        assert quantize(base, dst, precision) == 0
        files[precision] = dst
    return files


@pytest.fixture(scope="module")
def results(ggufs: dict[str, Path]) -> dict[str, dict]:
    return measure(ggufs["F32"], ggufs, n_threads=2, max_tokens=1536)


@pytest.mark.slow
def test_numbers_are_complete_and_finite(results: dict[str, dict]) -> None:
    assert list(results) == ["F32", *QUANTS]
    for label, res in results.items():
        assert tuple(res) == fidelity.RESULT_KEYS, label
        for key in fidelity.RESULT_KEYS:
            if key not in ("device", "budget"):
                assert math.isfinite(res[key]), (label, key, res[key])
        # measure() without a budget reads every chunk, as llama-perplexity does
        assert res["budget"]["mode"] == "all" and res["budget"]["stopped"] == "all", label
        assert res["budget"]["text_tokens"] == res["n_tokens"], label
        assert res["device"] == "cpu"  # n_gpu_layers=0
        assert res["n_tokens"] > 500
        assert res["ppl"] > 1 and res["ppl_base"] > 1
        assert 0 <= res["top1_agreement"] <= 1
        assert res["prompt_tps"] > 0 and res["gen_tps"] > 0
        assert res["kld_mean"] >= -1e-9
        assert 0 <= res["kld_median"] <= res["kld_p99"] <= res["kld_p99_9"] <= res["kld_max"], label
        assert res["ppl_ratio"] == pytest.approx(res["ppl"] / res["ppl_base"], rel=1e-9)
    # Every candidate is judged on the same positions against the same base.
    assert len({r["n_tokens"] for r in results.values()}) == 1
    assert len({r["ppl_base"] for r in results.values()}) == 1


@pytest.mark.slow
def test_base_against_itself_is_lossless(results: dict[str, dict]) -> None:
    same = results["F32"]
    assert abs(same["kld_mean"]) < 1e-6
    assert abs(same["ppl_delta_pct"]) < 1e-6
    assert same["top1_agreement"] == 1.0
    assert same["kld_max"] < 1e-6 and same["kld_mean_se"] < 1e-7 and same["top1_agreement_se"] == 0
    assert same["ppl_ratio"] == pytest.approx(1.0) and same["ppl_ratio_se"] < 1e-6


@pytest.mark.slow
def test_error_bars_are_real_and_order_the_quantizations(results: dict[str, dict]) -> None:
    for p in QUANTS:
        res = results[p]
        assert 0 < res["kld_mean_se"] < res["kld_mean"], p
        assert 0 < res["ppl_ratio_se"] < 1 and 0 < res["top1_agreement_se"] < 0.05, p
        assert res["kld_mean"] < res["kld_max"], p  # per-token values vary: the maximum is above the mean
    # Q2_K is worse than Q8_0 by far more than both errors
    q8, q2 = results["Q8_0"], results["Q2_K"]
    assert q2["kld_mean"] - q8["kld_mean"] > 3 * (q2["kld_mean_se"] + q8["kld_mean_se"])
    assert q2["kld_p99"] > q8["kld_p99"]


@pytest.mark.slow
def test_fewer_bits_cost_more(results: dict[str, dict]) -> None:
    kld = {p: results[p]["kld_mean"] for p in QUANTS}
    assert 0 < kld["Q8_0"] < kld["Q4_K_M"] < kld["Q2_K"], kld
    assert results["Q8_0"]["top1_agreement"] > results["Q2_K"]["top1_agreement"]
    # Perplexity changes are not ordered on random weights (their perplexity is about the vocabulary size, and noise
    # moves it either way); KL-divergence is the measure that orders quantizations.


@pytest.mark.slow
def test_thresholds_on_real_numbers(results: dict[str, dict]) -> None:
    q4 = results["Q4_K_M"]["kld_mean"]
    assert check_thresholds(results, {"Q8_0": {"max_kld": q4}, "Q4_K_M": {"max_kld": q4 * 1.01}}) == []
    # A limit can never be negative (issue 16: refused with the configuration); a perplexity rise is made certain
    # instead, since noise moves a random-weight model's perplexity either way.
    with pytest.raises(ConfigError, match="max_ppl_delta_pct must be a number ≥ 0"):
        check_thresholds(results, {"Q8_0": {"max_ppl_delta_pct": -1e9}})
    risen = {**results, "Q8_0": {**results["Q8_0"], "ppl_delta_pct": abs(results["Q8_0"]["ppl_delta_pct"]) + 1.0}}
    violations = check_thresholds(
        risen,
        {"q2_k": {"max_kld": q4, "min_top1": 1.0}, "Q8_0": {"max_ppl_delta_pct": 0}, "IQ1_S": {"max_kld": 0}},
    )
    assert len(violations) == 3, violations
    assert any(v.startswith("Q2_K: kld_mean") and "above the maximum max_kld" in v for v in violations)
    assert any(v.startswith("Q2_K: top1_agreement") and "below the minimum min_top1 = 1" in v for v in violations)
    assert any(v.startswith("Q8_0: ppl_delta_pct") for v in violations)


@pytest.mark.slow
def test_report_and_plot_from_real_numbers(ggufs: dict[str, Path], results: dict[str, dict], tmp_path: Path) -> None:
    from cecai_converter import report
    from cecai_converter.manifest import Manifest
    from cecai_converter.manifest_fields import Fidelity, read_fields

    files = [
        {"name": ggufs[p].name, "precision": p, "bytes": ggufs[p].stat().st_size, "sha256": "0" * 64,
         "fidelity": results[p]}
        for p in QUANTS
    ]  # fmt: skip
    data = {"schema": 1, "model_name": "tiny", "pair": "CPU_LLM_LLAMA", "base": {"precision": "F32"}, "files": files}
    # read as from a manifest.json next to the GGUFs (their bits per weight are measured)
    manifest = Manifest.from_dict(data, path=ggufs["F32"].parent / "manifest.json")
    markdown = report.render_markdown([manifest])
    for p in QUANTS:
        line = next(ln for ln in markdown.splitlines() if f"| {p} |" in ln)
        # the error shown is the larger of the per-token one and the one between the text's chunks
        se = read_fields(Fidelity, results[p]).error("top1_agreement_se")
        assert se is not None and se >= results[p]["top1_agreement_se"]
        assert f"{100 * results[p]['top1_agreement']:.1f} ± {100 * se:.1f}%" in line
        assert line.count("±") == 3  # KLD, PPL ratio, top-1
        assert "≈" not in line  # bits per weight measured from the GGUF next to the manifest
    png = report.plot(manifest, tmp_path / "tiny.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png.read_bytes()[16:24]) == (800, 500)


@pytest.mark.slow
def test_limits_the_tokens_evaluated(ggufs: dict[str, Path]) -> None:
    small = measure(ggufs["F32"], {"Q8_0": ggufs["Q8_0"]}, n_threads=2, n_ctx=128, max_tokens=256)
    # two chunks of 128 tokens, the second half of each scored (63 predictions per chunk)
    assert small["Q8_0"]["n_tokens"] == 2 * 63
    assert math.isfinite(small["Q8_0"]["kld_mean"])


@pytest.mark.slow
def test_broken_candidate_is_a_clear_error(ggufs: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(ggufs["Q8_0"].read_bytes()[:4096])  # header intact, tensor data missing
    with pytest.raises(MeasurementFailed) as info:
        measure(ggufs["F32"], {"Q8_0": ggufs["Q8_0"], "BROKEN": broken}, n_threads=2, max_tokens=256, n_ctx=128)
    assert "BROKEN" in info.value.message and str(broken) in info.value.message
    assert "llama.cpp log" in info.value.message
    assert info.value.hint


@pytest.mark.slow
def test_text_too_short(ggufs: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Too short to judge anything.", encoding="utf-8")
    # Found only with the model's tokenizer, after the conversion: a failed measurement (exit 1), not bad input.
    with pytest.raises(MeasurementFailed, match="evaluation text has only") as info:
        measure(ggufs["F32"], {"Q8_0": ggufs["Q8_0"]}, eval_text=text)
    assert info.value.exit_code == 1 and "EVAL_TEXT" in (info.value.hint or "")


# --- fast checks -----------------------------------------------------------------------------------------------


def test_shipped_eval_text_is_prose_of_a_few_thousand_words() -> None:
    text = fidelity.default_eval_text().read_text(encoding="utf-8")
    assert 1800 < len(text.split()) < 4000


def test_missing_files_are_usage_errors(tmp_path: Path) -> None:
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"Q4_K_M GGUF not found"):
        measure(gguf, {"Q4_K_M": tmp_path / "missing.gguf"})
    with pytest.raises(ConfigError, match="evaluation text not found"):
        measure(gguf, {"Q4_K_M": gguf}, eval_text=tmp_path / "none.txt")
    with pytest.raises(ConfigError, match="max_tokens"):
        measure(gguf, {"Q4_K_M": gguf}, max_tokens=3)


def test_thresholds_validation_and_edge_cases() -> None:
    results = {"Q4_K_M": {"kld_mean": 0.05, "ppl_delta_pct": 2.0, "top1_agreement": 0.9}}
    assert check_thresholds(results, {}) == []
    assert check_thresholds(results, {"Q4_K_M": {"max_kld": 0.05, "min_top1": 0.9, "max_ppl_delta_pct": 2}}) == []
    assert check_thresholds(results, {"Q8_0": {"max_kld": 0.0}}) == []  # not produced: nothing to judge
    assert len(check_thresholds(results, {"q4_k_m": {"max_kld": 0.01}})) == 1
    broken = {"Q4_K_M": {"kld_mean": float("nan"), "ppl_delta_pct": 1.0, "top1_agreement": 0.9}}
    (message,) = check_thresholds(broken, {"Q4_K_M": {"max_kld": 1.0}})
    assert "nan" in message
    with pytest.raises(ConfigError, match="unknown limit 'max_kl'") as info:
        check_thresholds(results, {"Q4_K_M": {"max_kl": 0.1}})
    assert "max_kld" in (info.value.hint or "")
    with pytest.raises(ConfigError, match="must be a number"):
        check_thresholds(results, {"Q4_K_M": {"max_kld": "low"}})
    with pytest.raises(ConfigError, match="mapping of limits"):
        check_thresholds(results, {"Q4_K_M": 0.1})  # type: ignore[dict-item]


def test_a_killed_worker_is_described() -> None:
    error = measurement._as_error("failed", "fidelity: evaluating X failed", "GGML_ASSERT(x) failed", "candidate")
    assert isinstance(error, MeasurementFailed) and isinstance(error, ConverterError)
    assert "GGML_ASSERT" in error.message and error.exit_code == 1
