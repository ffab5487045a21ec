"""Messages a user can act on (issue 9, item 11): a full disk while quantizing, llama.cpp's assertion instead of a
debugger's trailer, THRESHOLDS checked with the configuration, and ``--threads`` within llama.cpp's limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import convert_to_f32, ggufs_under

from cecai_converter.config import load_converter_dir
from cecai_converter.errors import ConfigError, ConversionFailed
from cecai_converter.precisions import PRECISIONS
from cecai_converter.processes import failure_summary
from cecai_converter.quantize import quantize

# ------------------------------------------------------------------------------------------------- --threads


@pytest.mark.parametrize("value", ["-1", "0", "100000", "4x"])
def test_threads_outside_1_to_512_are_refused_before_any_work(cli, tiny_llama, tmp_path, value):
    outdir = tmp_path / "out"
    result = cli("convert", tiny_llama, "--precision", "Q8_0", "--outdir", outdir, "--no-fidelity", "--threads", value)
    assert result.returncode == 2, result.stderr
    assert "argument --threads" in result.stderr and "Traceback" not in result.stderr
    assert ("1 to 512" in result.stderr) or ("not a whole number" in result.stderr)
    assert not outdir.exists()


def test_check_threads_are_refused_too(cli, tmp_path):
    result = cli("check", tmp_path, "--threads", "0")
    assert result.returncode == 2 and "argument --threads" in result.stderr and "1 to 512" in result.stderr


# ------------------------------------------------------------------------------------------------- THRESHOLDS


def _layout(root: Path, model: Path, thresholds: object) -> Path:
    converter = root / "Converter"
    cfg = converter / "configurations"
    (cfg / "CPU_LLM_LLAMA").mkdir(parents=True)
    (cfg / "converter_args.yaml").write_text(yaml.safe_dump({"MODEL_NAME": "tiny"}))
    pair = {"PRECISION": "Q8_0", "THRESHOLDS": thresholds}
    (cfg / "CPU_LLM_LLAMA" / "converter_args_cpu_llm_llama.yaml").write_text(yaml.safe_dump(pair))
    shutil.copytree(model, converter / "models" / "tiny")
    return converter


BAD_THRESHOLDS = {
    "unknown limit": ({"Q8_0": {"max_kl": 0.1}}, "unknown limit 'max_kl'"),
    "unknown precision": ({"Q8_O": {"max_kld": 0.1}}, "unknown precision 'Q8_O'. Did you mean Q8_0?"),
    "not a number": ({"Q8_0": {"max_kld": "low"}}, "Q8_0.max_kld must be a number ≥ 0, got 'low'"),
    "not finite": ({"Q8_0": {"max_kld": float("nan")}}, "Q8_0.max_kld must be a number ≥ 0, got nan"),
    "limits not a mapping": ({"Q8_0": 0.1}, "Q8_0: expected a mapping of limits, got 0.1"),
    "not a mapping": ([1, 2], "expected a mapping PRECISION -> limits"),
}


@pytest.mark.parametrize("case", sorted(BAD_THRESHOLDS))
def test_bad_thresholds_are_refused_before_converting_even_without_fidelity(cli, tiny_llama, tmp_path, case):
    thresholds, phrase = BAD_THRESHOLDS[case]
    converter = _layout(tmp_path, tiny_llama, thresholds)
    result = cli("run", converter, "--no-fidelity")
    assert result.returncode == 2, result.stderr
    assert "converter_args_cpu_llm_llama.yaml: THRESHOLDS" in result.stderr
    assert phrase in result.stderr and "Traceback" not in result.stderr
    assert ggufs_under(converter) == [] and not list(converter.rglob(".cecai-tmp-*"))


def test_thresholds_are_read_with_canonical_precision_names(tmp_path, tiny_llama):
    converter = _layout(tmp_path, tiny_llama, {"q4_k_m": {"max_kld": 1}, "FP16": {"min_top1": 0.5}})
    (job,) = load_converter_dir(converter)
    assert job.settings["THRESHOLDS"] == {"Q4_K_M": {"max_kld": 1.0}, "F16": {"min_top1": 0.5}}
    with pytest.raises(ConfigError, match="THRESHOLDS: unknown precision"):
        load_converter_dir(_layout(tmp_path / "b", tiny_llama, {"Q9": {"max_kld": 1}}))


# ------------------------------------------------------------------------------------------------- llama.cpp aborts

GDB_TAIL = """\
/tmp/pip-wheel-x/llama-cpp-python_3c3b/vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp:4132: GGML_ASSERT(eps >= 0.0f) failed
[New LWP 25364]
[Thread debugging using libthread_db enabled]
Using host libthread_db library "/lib/x86_64-linux-gnu/libthread_db.so.1".
0x00007eff6fcf1c17 in __GI___wait4 (pid=25365) at ../sysdeps/unix/sysv/linux/wait4.c:30
#0  0x00007eff6fcf1c17 in __GI___wait4 (pid=25365, stat_loc=0x0, options=0, usage=0x0) at wait4.c:30
#1  0x00007eff6ef4e68b in ggml_print_backtrace () from /x/libggml-base.so.0
360\t../csu/libc-start.c: No such file or directory.
#45 0x000055fdb6cd0081 in _start ()
[Inferior 1 (process 25298) detached]
"""


def test_failure_summary_keeps_the_assertion_and_drops_the_debugger():
    assert failure_summary(GDB_TAIL) == "ggml/src/ggml-cpu/ops.cpp:4132: GGML_ASSERT(eps >= 0.0f) failed"
    assert failure_summary("loading\nerror: bad magic\n#0 0x1 in f ()\n") == "loading | error: bad magic"
    assert failure_summary("") == "(no output)"


@pytest.mark.slow
def test_a_nan_rms_norm_eps_reports_llama_cpps_assertion(cli, tiny_llama, tmp_path):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = float("nan")  # json writes NaN, which Python's and the converter's readers accept
    (model / "config.json").write_text(json.dumps(config))
    result = cli("convert", model, "--precision", "Q8_0", "--outdir", tmp_path / "out", "--no-fidelity")
    assert result.returncode == 1, result.stderr
    assert "GGML_ASSERT(eps >= 0.0f) failed" in result.stderr
    for noise in ("Inferior", "#0 ", "ptrace", "libc-start", "LWP"):
        assert noise not in result.stderr, result.stderr
    assert ggufs_under(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KB tmpfs: room for the quantizer to start writing, not to finish."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs as a full disk")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=False).returncode:
        pytest.skip("could not mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_while_quantizing_says_so_and_where(tiny_llama, tmp_path, small_disk):
    base = convert_to_f32(tiny_llama, tmp_path / "base.f32.gguf")
    dest = small_disk / "tiny.q8_0.gguf"
    with pytest.raises(ConversionFailed) as info:
        quantize(base, dest, PRECISIONS["Q8_0"], threads=1)
    message = info.value.message
    assert "the disk is full" in message and str(small_disk) in message, message
    assert "iostream" not in message
    assert str(small_disk) in (info.value.hint or "")
    assert list(small_disk.iterdir()) == []  # the partial file is gone
