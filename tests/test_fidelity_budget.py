"""Fidelity's token budget set by the error bar, the base's cache, and reference rows from the same evaluation.

The stopping rule is tested on synthetic per-token KL-divergence streams (fast); the rest on a tiny real model
(llama.cpp through the same workers as a run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cecai_converter import fidelity
from cecai_converter.errors import ConfigError, ManifestError, UsageError
from cecai_converter.fidelity import Budget, mean_and_se, stop_reason
from cecai_converter.manifest import Manifest
from cecai_converter.request import resolve
from cecai_converter.toolchain import cache_root

PER_CHUNK = 255  # scored positions of a 512-token chunk


def _stop_chunk(kld: np.ndarray, same: np.ndarray, budget: Budget) -> int | None:
    """The chunk after which the rule stops on these streams, asked after every chunk as the worker does."""
    for chunks in range(1, len(kld) // PER_CHUNK + 1):
        n = chunks * PER_CHUNK
        if stop_reason(kld[:n], same[:n], budget) is not None:
            return chunks
    return None


def test_stops_at_the_first_chunk_whose_error_bar_is_within_the_target() -> None:
    rng = np.random.default_rng(0)
    kld = rng.lognormal(mean=-3.0, sigma=1.5, size=20 * PER_CHUNK)  # heavy-tailed, as per-token KLDs are
    same = rng.random(kld.size) < 0.95
    budget = Budget(target=0.10, kld_se_floor=0.0, min_tokens=500)
    chunks = _stop_chunk(kld, same, budget)
    assert chunks is not None
    n = chunks * PER_CHUNK
    mean, se = mean_and_se(kld[:n])
    assert se <= 0.10 * mean  # the precision reached is the one asked for…
    before_mean, before_se = mean_and_se(kld[: n - PER_CHUNK])
    assert before_se > 0.10 * before_mean  # …and one chunk fewer would not have been enough
    # lognormal(σ=1.5): CV² = e^{σ²} − 1 ≈ 8.5, so about 100 · CV² ≈ 850 positions: well under the whole stream
    assert 500 <= n <= 2000
    # what the base is evaluated up to when the candidate asks for more: close to where the rule stops
    estimate = fidelity.tokens_needed(kld[:500], same[:500], budget)
    assert n / 2 <= estimate <= 2 * n
    # a tighter target reads more
    tighter = _stop_chunk(kld, same, Budget(target=0.05, kld_se_floor=0.0, min_tokens=500))
    assert tighter is not None and tighter > chunks


def test_never_stops_before_the_minimum() -> None:
    kld = np.full(2000, 0.01)  # no spread at all: converged from the first position
    same = np.ones(2000, dtype=bool)
    budget = Budget(min_tokens=500)
    assert stop_reason(kld[:499], same[:499], budget) is None
    assert stop_reason(kld[:500], same[:500], budget) == "target"


def test_near_lossless_files_stop_at_the_absolute_floor() -> None:
    rng = np.random.default_rng(1)
    kld = rng.lognormal(mean=-10.0, sigma=2.0, size=4000)  # a mean around 3e-4 nats, very spread
    same = np.ones(kld.size, dtype=bool)
    relative_only = Budget(target=0.10, kld_se_floor=0.0, min_tokens=500)
    with_floor = Budget(target=0.10, min_tokens=500)  # the default floor, KLD_SE_FLOOR
    assert stop_reason(kld[:510], same[:510], relative_only) is None  # ±10 % of ~0 needs far more positions
    assert stop_reason(kld[:510], same[:510], with_floor) == "target"
    assert mean_and_se(kld[:510])[1] <= fidelity.KLD_SE_FLOOR


def test_top1_needs_its_own_two_points() -> None:
    kld = np.full(1000, 0.2)
    same = np.arange(1000) % 2 == 0  # agreement 0.5: the widest error, sqrt(0.25 / (n − 1)) ≤ 0.02 at n ≥ 626
    budget = Budget(min_tokens=100)
    assert stop_reason(kld[:600], same[:600], budget) is None
    assert stop_reason(kld[:640], same[:640], budget) == "target"
    assert fidelity.tokens_needed(kld[:300], same[:300], budget) == 626  # 0.25 / 0.02² + 1


def test_broken_streams_never_stop() -> None:
    same = np.ones(600, dtype=bool)
    nan = np.full(600, np.nan)
    assert stop_reason(nan, same, Budget(min_tokens=100)) is None
    assert stop_reason(np.zeros(599), same, Budget(min_tokens=100)) is None  # series of different lengths


def test_the_target_and_the_token_mode_are_options() -> None:
    request = resolve({}, {}, {}, command="convert")
    assert request["fidelity_target"] == 0.1 and request["fidelity_tokens"] == "auto"
    options = resolve({}, {"FIDELITY_TARGET": 0.05}, {"CECAI_FIDELITY_TOKENS": "ALL"}).to_options()
    assert options.fidelity_target == 0.05 and options.fidelity_tokens == "all"
    assert resolve({"fidelity_target": 0.2}, {}, {}).to_options().fidelity_target == 0.2
    with pytest.raises(ConfigError, match=r"FIDELITY_TARGET must be a fraction between 0\.01 and 1"):
        resolve({}, {"FIDELITY_TARGET": 10}, {})
    with pytest.raises(ConfigError, match="FIDELITY_TOKENS must be one of auto, all"):
        resolve({}, {"FIDELITY_TOKENS": 2048}, {})
    with pytest.raises(UsageError, match="CECAI_FIDELITY_TARGET"):
        resolve({}, {}, {"CECAI_FIDELITY_TARGET": "ten percent"})


def test_bad_fidelity_flags_exit_2_before_any_work(cli: Any, tmp_path: Path) -> None:
    result = cli("convert", tmp_path / "nowhere", "--precision", "Q8_0", "--outdir", tmp_path / "o",
                 "--fidelity-target", "0")  # fmt: skip
    assert result.returncode == 2 and "--fidelity-target" in result.stderr and "Traceback" not in result.stderr


def _manifest_with(fid: dict[str, Any]) -> dict[str, Any]:
    entry = {"name": "m.q8_0.gguf", "precision": "Q8_0", "bytes": 1, "sha256": "0" * 64, "fidelity": fid}
    return {"schema": 1, "model_name": "m", "files": [entry]}


def test_manifest_refuses_a_malformed_budget_naming_the_field() -> None:
    good = {"n_tokens": 510, "budget": {"mode": "auto", "target": 0.1, "kld_se_floor": 0.0005, "top1_se_max": 0.02,
                                        "min_tokens": 500, "text_tokens": 1530, "stopped": "target",
                                        "kld_rel_se": 0.08}}  # fmt: skip
    assert Manifest.from_dict(_manifest_with(good)).files[0].fidelity == good
    assert Manifest.from_dict(_manifest_with({"kld_mean": 0.1})).files[0].fidelity == {"kld_mean": 0.1}  # older
    for bad, field in (
        ({**good, "budget": {**good["budget"], "stopped": "tired"}}, "budget.stopped"),
        ({**good, "budget": {**good["budget"], "text_tokens": "many"}}, "budget.text_tokens"),
        ({**good, "n_tokens": 5000}, "n_tokens"),
        ({**good, "budget": {**good["budget"], "target": "0.1"}}, "budget.target"),
    ):
        with pytest.raises(ManifestError, match=rf"files\[0\]\.fidelity\.{field}"):
            Manifest.from_dict(_manifest_with(bad))


# -- a tiny real model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama as F32 GGUF and two quantizations of it."""
    from conftest import convert_to_f32, require_module

    require_module("llama", "llama_cpp")
    require_module("torch", "torch")
    from test_fidelity import quantize

    from cecai_converter.modelgen import build_model

    root = tmp_path_factory.mktemp("budget")
    base = convert_to_f32(build_model(root / "hf", "llama", seed=1), root / "tiny.f32.gguf")
    files = {"F32": base}
    for precision in ("Q8_0", "Q2_K"):
        dst = root / f"tiny.{precision.lower()}.gguf"
        assert quantize(base, dst, precision) == 0
        files[precision] = dst
    return files


@pytest.mark.slow
def test_a_budget_that_is_never_met_reads_the_whole_text_as_measure_does(
    ggufs: dict[str, Path], tmp_path: Path
) -> None:
    """The base is evaluated in steps (the minimum, then what the candidate's error bars say it needs: here the
    rest) and the candidate resumes after each; the numbers are those of one pass over every chunk, on the same
    positions."""
    whole = fidelity.measure(ggufs["F32"], {"Q2_K": ggufs["Q2_K"]}, n_threads=2, n_ctx=128, max_tokens=1024)["Q2_K"]
    unreachable = Budget(target=0.01, kld_se_floor=0.0, top1_se=0.0, min_tokens=100)
    run = fidelity.measure_run(ggufs["F32"], {"Q2_K": ggufs["Q2_K"]}, n_threads=2, n_ctx=128, max_tokens=1024,
                               budget=unreachable, cache_root=tmp_path / "cache")  # fmt: skip
    stepped = run.results["Q2_K"]
    assert whole["n_tokens"] == stepped["n_tokens"] == 8 * 63  # 8 chunks of 128, 63 scored in each
    assert stepped["budget"]["stopped"] == "text_end" and whole["budget"]["stopped"] == "all"
    for key in ("kld_mean", "kld_mean_se", "kld_p99", "ppl", "ppl_base", "ppl_ratio_se", "top1_agreement"):
        assert stepped[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
    assert run.base_tokens_evaluated == 8 * 63


@pytest.mark.slow
def test_budget_cache_and_reference_rows(ggufs: dict[str, Path], tmp_path: Path) -> None:
    from cecai_converter.agreement import make_reference
    from cecai_converter.verify import load_check

    cache = tmp_path / "cache"
    budget = Budget(target=0.10, min_tokens=100)
    first = fidelity.measure_run(
        ggufs["F32"], {"Q8_0": ggufs["Q8_0"]}, n_threads=2, n_ctx=128, max_tokens=1024, budget=budget,
        cache_root=cache, reference_positions=32, verify={"Q8_0"},
    )  # fmt: skip
    q8 = first.results["Q8_0"]
    assert q8["budget"]["mode"] == "auto" and q8["budget"]["text_tokens"] == 8 * 63
    assert q8["budget"]["stopped"] in ("target", "text_end")
    if q8["budget"]["stopped"] == "target":  # what the manifest says was reached, it reached
        assert q8["n_tokens"] >= 100 and q8["top1_agreement_se"] <= 0.02
        assert q8["kld_mean_se"] <= max(0.1 * q8["kld_mean"], fidelity.KLD_SE_FLOOR)
    assert 0 < first.base_tokens_evaluated <= 8 * 63
    # A second run on the same base and text, with another file: the base is not evaluated again for the
    # positions already cached.
    second = fidelity.measure_run(ggufs["F32"], {"Q8_0": ggufs["Q8_0"], "Q2_K": ggufs["Q2_K"]}, n_threads=2,
                                  n_ctx=128, max_tokens=1024, budget=budget, cache_root=cache)  # fmt: skip
    assert second.results["Q8_0"] == {**q8, "prompt_tps": second.results["Q8_0"]["prompt_tps"],
                                      "gen_tps": second.results["Q8_0"]["gen_tps"]}  # fmt: skip
    covered = first.base_tokens_evaluated
    if second.results["Q2_K"]["n_tokens"] <= covered:
        assert second.base_tokens_evaluated == 0
    else:  # only the chunks past the cached ones
        assert 0 < second.base_tokens_evaluated <= 8 * 63 - covered
    assert len(list(cache.iterdir())) == 1  # one base, one text: one entry
    # The reference rows taken from the fidelity evaluation are what a separate evaluation of those tokens gives.
    tokens = first.reference_tokens
    assert len(tokens) == 32
    separate = make_reference({"q8": ggufs["Q8_0"]}, threads=2, tokens=tokens)["files"]["q8"]
    rows = first.reference_rows["Q8_0"]
    # …and the file was verified in that same load, as verify.py's own worker verifies it
    alone = load_check(ggufs["Q8_0"], threads=2)
    assert first.verifications["Q8_0"] == alone.as_dict() and alone.generated_tokens
    assert "Q2_K" not in second.verifications  # not asked
    assert rows["ids"] == separate["ids"]
    np.testing.assert_allclose(rows["logprobs"], separate["logprobs"], atol=2e-6)


@pytest.mark.slow
def test_a_rerun_adding_a_precision_does_not_evaluate_the_base_again(
    cli: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    """The real pipeline: fidelity on (the default budget), reference.json from the same evaluation."""
    # a fresh fidelity cache (under XDG_CACHE_HOME); the toolchain stays where it was resolved: no re-fetch
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "CECAI_TOOLCHAIN_DIR": str(cache_root())}
    out = tmp_path / "out"
    common = ("--outdir", out, "--model-name", "tiny", "--no-source-check", "--fidelity-target", "1")
    first = cli("convert", tiny_llama, "--precision", "Q8_0", *common, env=env)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (q8,) = manifest["files"]
    assert q8["fidelity"]["budget"]["mode"] == "auto" and q8["fidelity"]["n_tokens"] >= fidelity.MIN_BUDGET_TOKENS
    covered = manifest["timings"]["fidelity_base_tokens"]["all"]
    # one load of the file for verification, fidelity and its reference rows: no verification worker ran
    assert q8["verification"]["generated_tokens"] and q8["verification"]["runtime"] == "cpu"
    assert manifest["timings"]["verify_s"] == {} and "reference_s" in manifest["timings"]
    assert covered >= q8["fidelity"]["n_tokens"]
    ref1 = json.loads((out / "reference.json").read_text())
    assert list(ref1["files"]) == ["tiny.q8_0.gguf"] and ref1["files"]["tiny.q8_0.gguf"]["sha256"] == q8["sha256"]

    # F16 of an F32 base is near-lossless: it stops at the minimum, which the first run's base evaluation covers
    second = cli("convert", tiny_llama, "--precision", "Q8_0", "--precision", "F16", *common, env=env)
    assert second.returncode == 0, second.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f["precision"]: f for f in manifest["files"]}
    assert files["Q8_0"]["reused"] and not files["F16"]["reused"]
    assert files["F16"]["fidelity"]["budget"]["mode"] == "auto"
    # the base was converted again (same bytes) but its log-probabilities came from the cache
    assert files["F16"]["fidelity"]["n_tokens"] <= covered
    assert manifest["timings"]["fidelity_base_tokens"]["all"] == 0
    ref2 = json.loads((out / "reference.json").read_text())
    assert ref2["tokens"] == ref1["tokens"]
    # Q8_0 was reused, so its rows were made by a separate load on the same tokens: they match the first run's,
    # which came from the fidelity evaluation.
    assert ref2["files"]["tiny.q8_0.gguf"]["ids"] == ref1["files"]["tiny.q8_0.gguf"]["ids"]
    np.testing.assert_allclose(
        ref2["files"]["tiny.q8_0.gguf"]["logprobs"], ref1["files"]["tiny.q8_0.gguf"]["logprobs"], atol=2e-6
    )
    assert math.isfinite(files["F16"]["fidelity"]["kld_mean"])


def test_a_link_planted_in_the_cache_is_refused(tmp_path: Path) -> None:
    from cecai_converter.errors import SymlinkRefused
    from cecai_converter.texts import MAX_TEXT_TOKENS

    base, text = tmp_path / "base.gguf", tmp_path / "eval.txt"
    base.write_bytes(b"GGUF")  # never loaded: the refusal comes first
    text.write_text("some text\n")
    key = fidelity.base_cache_key("ab" * 32, text, n_ctx=512, max_tokens=MAX_TEXT_TOKENS)
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    (cache / key[:40]).symlink_to(elsewhere)
    with pytest.raises(SymlinkRefused, match="refusing to write the base's cached evaluation") as info:
        fidelity.measure_run(base, {"Q8_0": base}, eval_text=text, cache_root=cache, base_sha256="ab" * 32)
    assert "fidelity's cache" in (info.value.hint or "")
    assert list(elsewhere.iterdir()) == []


def test_a_damaged_cache_entry_is_made_again(tmp_path: Path) -> None:
    from cecai_converter.fidelity.cache import _CACHE_VERSION, _cached_chunks

    np.save(tmp_path / "base-0.npy", np.zeros((2, 2), dtype=np.float32))
    np.save(tmp_path / "base-nll-0.npy", np.zeros(2))
    good = f'{{"version": {_CACHE_VERSION}, "n_ctx": 512, "n_vocab": 10, "n_chunks": 3}}'
    older = good.replace(f'"version": {_CACHE_VERSION}', f'"version": {_CACHE_VERSION - 1}')
    for meta in ("{not json", good.replace("512", '"512"'), "[]", older):
        (tmp_path / "meta.json").write_text(meta)
        assert _cached_chunks(tmp_path) == (None, 0), meta  # the base worker tokenizes and evaluates again
    (tmp_path / "meta.json").write_text(good)
    assert _cached_chunks(tmp_path)[1] == 1  # chunk 0 on disk, 1 and 2 still to evaluate


def test_chunks_are_read_across_the_text_and_all_of_them_once() -> None:
    for n in range(1, 40):
        order = fidelity.spread_order(n)
        assert sorted(order) == list(range(n)) and order[0] == 0
    # the first four of 13 chunks reach every quarter of the text
    assert sorted(fidelity.spread_order(13)[:4]) == [0, 3, 6, 9]


def test_the_rule_holds_the_error_between_chunks() -> None:
    """Positions that vary little inside a chunk but whose chunks differ (a passage's context moves them all):
    the per-position error says the mean is known to a fraction of a percent, the chunks' spread says ±10 %."""
    rng = np.random.default_rng(5)
    per = 255
    levels = rng.lognormal(np.log(0.05), 0.4, size=13)  # above the floor: the 10 % target decides
    kld = np.concatenate([rng.normal(level, level * 0.1, per) for level in levels])
    same = np.ones(kld.size, dtype=bool)
    budget = fidelity.Budget()
    between = fidelity.chunk_se(kld[: 4 * per], per)
    assert between is not None and between > 5 * fidelity.mean_and_se(kld[: 4 * per])[1]
    assert fidelity.chunk_se(kld[:per], per) is None  # one chunk has no spread between chunks
    # without the chunk length the old rule stops at the fewest positions; with it, not before min_chunks, and only
    # once the chunks' spread allows
    assert fidelity.stop_reason(kld[: 2 * per], same[: 2 * per], budget) == "target"
    assert fidelity.stop_reason(kld[: 2 * per], same[: 2 * per], budget, per_chunk=per) is None
    stops = [k for k in range(1, 14) if fidelity.stop_reason(kld[: k * per], same[: k * per], budget, per_chunk=per)]
    first = stops[0] if stops else 14
    assert first >= budget.min_chunks
    if stops:
        se = fidelity.chunk_se(kld[: first * per], per)
        assert se is not None and se <= budget.target * kld[: first * per].mean()
    need = fidelity.tokens_needed(kld[: 2 * per], same[: 2 * per], budget, per_chunk=per)
    assert need >= budget.min_chunks * per
