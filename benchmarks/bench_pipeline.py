"""Benchmark: the cecai-converter pipeline against the llama.cpp tools run by hand (issue 2, "Benchmark").

A script, not a test. It builds a random-weight Llama model locally (``--size 1gb``: 0.55 B parameters, 1.1 GB
of bf16 safetensors, checked and printed; nothing is downloaded), then compares, each against a baseline run in the
same invocation:

(a) one job, ``cecai-convert convert MODEL --precision Q8_0 --precision Q4_K_M --no-fidelity`` (convert once, two
    quantizations, read-back + load-and-generate verification of each file) against the same job done by hand with
    the same pinned llama.cpp: ``convert_hf_to_gguf.py MODEL --outtype bf16`` then two calls of the quantizer
    (``python -m cecai_converter.quantize``, the bare ``llama_model_quantize`` call). Goal: ratio <= 1.10. The
    pipeline's time without verification is printed too (from the manifest's per-step timings).
(b) one model, three precisions, four pairs: ``cecai-convert run CONVERTER_DIR --no-fidelity --n-gpu-layers 0`` on
    a seed layout with every pair folder, against the old way: for each pair, for each precision, convert + quantize
    (12 conversions, 12 quantizations). Goal: ratio <= 0.30. ``--old-way estimate`` times one pair (its three
    precisions) and multiplies by four: an extrapolation, labelled as such. ``--skip-old-way`` skips it.
(c) the unchanged re-run of (b): seconds. Goal: < 2.
(d) peak RSS: every command runs under a fresh wrapper process that reads ``getrusage(RUSAGE_CHILDREN)``, i.e.
    the largest resident set of the command and all its descendants. The pipeline's figure covers its converter,
    quantizer and verification children; the converter's own figure comes from the hand-run converter of (a).

It also checks the issue's "Done when" item on the real-sized model: the CPU_LLM_LLAMA pair of (b) has Q8_0 and
Q4_K_M files that carry verification records and load again with ``cecai-convert verify``.

The figures go to stdout and, as a Markdown table, to ``benchmarks/results.md`` (``--results`` to change).

    python benchmarks/bench_pipeline.py [--size 1gb] [--workdir DIR] [--threads N] [--old-way full|estimate]
                                        [--skip-old-way] [--keep-files]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cecai_converter.manifest import Manifest, load_manifest
from cecai_converter.modelgen import SIZES, build_model
from cecai_converter.precisions import PRECISIONS
from cecai_converter.toolchain import LLAMA_CPP_PYTHON_VERSION, ensure_converter

BENCH_DIR = Path(__file__).resolve().parent
MODEL_NAME = "bench-llama"
PAIRS = ("CPU_LLM_LLAMA", "GPU_LLM_LLAMA", "ARM_LLM_LLAMA", "AGX_ORIN_LLM_LLAMA")
JOB_A = ("Q8_0", "Q4_K_M")
JOB_B = ("Q8_0", "Q6_K", "Q4_K_M")
GOALS = {"a": 1.10, "b": 0.30, "c": 2.0}
# Same environment for the pipeline and the hand-run tools: offline (a local folder needs no network).
TOOL_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

# Runs sys.argv[2:] with its output appended to sys.argv[1]; prints wall seconds, exit status and the peak RSS of
# the command and all its descendants (ru_maxrss of RUSAGE_CHILDREN, KiB on Linux). A fresh process per command,
# so that one command's peak never hides another's.
_WRAPPER = """
import json, resource, subprocess, sys, time
with open(sys.argv[1], "ab") as log:
    t0 = time.perf_counter()
    rc = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


@dataclass(frozen=True)
class Measured:
    """One command's wall time and peak RSS (itself and its descendants)."""

    label: str
    argv: tuple[str, ...]
    wall_s: float
    maxrss_bytes: int


@dataclass
class Results:
    """Everything measured in one invocation; ``None`` means not measured."""

    model_bytes: int = 0
    n_params: int = 0
    a_raw: list[Measured] = field(default_factory=list)
    a_pipe: Measured | None = None
    a_manifest: Manifest = field(default_factory=Manifest)
    a_raw_totals: list[float] = field(default_factory=list)
    a_pipe_totals: list[float] = field(default_factory=list)
    b_pipe: Measured | None = None
    b_old: list[Measured] = field(default_factory=list)
    b_old_mode: str = "skipped"
    b_old_factor: int = 1
    c_rerun: Measured | None = None
    c_said_up_to_date: bool = False
    done_when: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class BenchError(RuntimeError):
    """A measured command failed; the message names its log."""


def measure(label: str, argv: Sequence[str], log: Path) -> Measured:
    """Run ``argv`` under the wrapper; return its wall time and peak RSS, or raise if it failed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n$ {shlex.join(argv)}\n")
    print(f"  running {label} ...", flush=True)
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(log), *argv],
        env={**os.environ, **TOOL_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"{label}: the wrapper failed: {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if data["rc"] != 0:
        raise BenchError(f"{label} failed (exit {data['rc']}); see {log}")
    result = Measured(label, tuple(argv), float(data["wall_s"]), int(data["maxrss_kib"]) * 1024)
    print(f"    {result.wall_s:8.1f} s   peak RSS {result.maxrss_bytes / 2**30:.2f} GiB", flush=True)
    return result


# -- commands ------------------------------------------------------------------------------------------------------
def converter_argv(converter_dir: Path, model: Path, outfile: Path) -> list[str]:
    """The converter as a user runs it by hand: the model in its own dtype (bf16) to one GGUF file."""
    script = converter_dir / "convert_hf_to_gguf.py"
    return [sys.executable, str(script), str(model), "--outtype", "bf16", "--outfile", str(outfile)]


def quantize_argv(src: Path, dst: Path, precision: str, threads: int) -> list[str]:
    """The bare ``llama_model_quantize`` call (the same quantizer the pipeline uses), in its own process."""
    ftype = str(PRECISIONS[precision].ftype)
    return [sys.executable, "-m", "cecai_converter.quantize", str(src), str(dst), ftype, "--threads", str(threads)]


def cli_argv(*args: str) -> list[str]:
    """``cecai-convert`` from this interpreter's environment."""
    exe = Path(sys.executable).with_name("cecai-convert")
    return [str(exe) if exe.exists() else "cecai-convert", *args]


def raw_job(
    converter_dir: Path, model: Path, outdir: Path, precisions: Sequence[str], threads: int, log: Path, tag: str
) -> list[Measured]:
    """Convert to bf16 once, then quantize each precision; the base is removed after (untimed)."""
    outdir.mkdir(parents=True, exist_ok=True)
    base = outdir / "base.bf16.gguf"
    runs = [measure(f"{tag} convert (bf16)", converter_argv(converter_dir, model, base), log)]
    for precision in precisions:
        dst = outdir / f"{MODEL_NAME}.{precision.lower()}.gguf"
        runs.append(measure(f"{tag} quantize {precision}", quantize_argv(base, dst, precision, threads), log))
    base.unlink()
    return runs


# -- setup ---------------------------------------------------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    """Total size of the regular files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure_model(workdir: Path, size: str) -> Path:
    """Build the benchmark model once per workdir (a marker file records which size it is)."""
    model = workdir / f"model-{size}"
    marker = workdir / f".model-{size}.built"
    if marker.is_file() and (model / "config.json").is_file():
        print(f"reusing the model built earlier in {model}")
        return model
    print(f"building a random-weight Llama ({size}, bf16) in {model} ...", flush=True)
    build_model(model, "llama", size=size, dtype="bfloat16", seed=0)
    marker.write_text("ok\n")
    return model


def count_params(model: Path) -> int:
    """Parameters in the model's safetensors files (from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = 1
                for dim in fh.get_slice(name).get_shape():
                    n *= dim
                total += n
    return total


def link_tree(src: Path, dest: Path) -> None:
    """``dest`` gets ``src``'s files as hard links (same filesystem), else copies. A symlinked folder would
    resolve outside MODELS_PATH, which the configuration loader rightly refuses."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def make_layout(root: Path, model: Path, precisions: Sequence[str]) -> Path:
    """A ``<NAME>/Converter`` folder with all four pair folders, reusing ``model`` under ``models/``."""
    if root.exists():
        shutil.rmtree(root)
    converter = root / "Converter"
    config_dir = converter / "configurations"
    config_dir.mkdir(parents=True)
    general = {
        "IMAGE_NAME": "ghcr.io/cecai/cecai-converter:0.1.0-cpu",
        "MODEL_NAME": MODEL_NAME,
        "TRAINED": False,
        "MODELS_PATH": "../models",
        "LOGS_PATH": "../logs",
        "OUTPUTS_PATH": "../outputs",
    }
    (config_dir / "converter_args.yaml").write_text(yaml.safe_dump(general, sort_keys=False))
    for pair in PAIRS:
        (config_dir / pair).mkdir()
        body = yaml.safe_dump({"PRECISION": list(precisions)}, sort_keys=False)
        (config_dir / pair / f"converter_args_{pair.lower()}.yaml").write_text(body)
    link_tree(model, converter / "models" / MODEL_NAME)
    return converter


# -- the four measurements -----------------------------------------------------------------------------------------
def bench_a(res: Results, converter_dir: Path, model: Path, work: Path, threads: int, log: Path, repeats: int) -> None:
    """(a) one job, by hand vs the pipeline, ``repeats`` times in alternating order; the fastest of each is kept.

    Both sides read the model from the page cache (it was just written, and RAM is ample).
    """
    print("\n(a) convert + Q8_0 + Q4_K_M: llama.cpp tools by hand vs cecai-convert convert", flush=True)
    raw_out, pipe_out = work / "a-raw", work / "a-pipeline"
    argv = cli_argv("convert", str(model), "--model-name", MODEL_NAME, "--outdir", str(pipe_out), "--no-fidelity")
    argv += ["--threads", str(threads), "--n-gpu-layers", "0"]
    for p in JOB_A:
        argv += ["--precision", p]

    def by_hand() -> None:
        shutil.rmtree(raw_out, ignore_errors=True)
        runs = raw_job(converter_dir, model, raw_out, JOB_A, threads, log, "by hand:")
        shutil.rmtree(raw_out)
        res.a_raw_totals.append(_sum(runs))
        if not res.a_raw or _sum(runs) < _sum(res.a_raw):
            res.a_raw = runs

    def pipeline() -> None:
        shutil.rmtree(pipe_out, ignore_errors=True)
        run = measure("pipeline: cecai-convert convert", argv, log)
        manifest = load_manifest(pipe_out / "manifest.json")
        shutil.rmtree(pipe_out)
        res.a_pipe_totals.append(run.wall_s)
        if res.a_pipe is None or run.wall_s < res.a_pipe.wall_s:
            res.a_pipe, res.a_manifest = run, manifest

    for i in range(repeats):
        if repeats > 1:
            print(f"  repeat {i + 1}/{repeats}", flush=True)
        for side in (by_hand, pipeline) if i % 2 == 0 else (pipeline, by_hand):
            side()


def bench_b(res: Results, converter_dir: Path, model: Path, work: Path, threads: int, log: Path, old_way: str) -> Path:
    """(b) four pairs x three precisions, pipeline vs the old way; (c) the unchanged re-run. Returns the layout."""
    print(f"\n(b) one model, {len(JOB_B)} precisions, {len(PAIRS)} pairs: cecai-convert run vs the old way", flush=True)
    converter = make_layout(work / "Bench", model, JOB_B)
    run_argv = cli_argv("run", str(converter), "--no-fidelity", "--n-gpu-layers", "0", "--threads", str(threads))
    res.b_pipe = measure("pipeline: cecai-convert run (4 pairs)", run_argv, log)

    print("\n(c) the unchanged re-run of (b)", flush=True)
    rerun_log = work / "rerun.log"
    rerun_log.unlink(missing_ok=True)
    res.c_rerun = measure("pipeline: cecai-convert run, unchanged", run_argv, rerun_log)
    res.c_said_up_to_date = "up to date" in rerun_log.read_text()
    with log.open("a") as fh:
        fh.write(rerun_log.read_text())

    if old_way == "skip":
        res.b_old_mode = "skipped"
        return converter
    pairs = PAIRS if old_way == "full" else PAIRS[:1]
    res.b_old_mode = old_way
    res.b_old_factor = len(PAIRS) // len(pairs)
    label = "full" if old_way == "full" else f"ESTIMATE: one pair timed, x{res.b_old_factor}"
    print(f"\n(b) the old way ({label}): per pair, per precision, convert + quantize", flush=True)
    old_out = work / "b-old"
    for pair in pairs:
        for precision in JOB_B:
            folder = old_out / pair / precision
            tag = f"old way {pair} {precision}:"
            res.b_old += raw_job(converter_dir, model, folder, (precision,), threads, log, tag)
            shutil.rmtree(folder)
    shutil.rmtree(old_out, ignore_errors=True)
    return converter


def check_done_when(res: Results, converter: Path, log: Path) -> None:
    """The issue's "Done when": the CPU pair's Q8_0 and Q4_K_M files, from the real-sized model, are verified."""
    print("\nchecking the CPU pair's outputs (issue 2, 'Done when')", flush=True)
    folder = converter / "outputs" / "CPU_LLM_LLAMA"
    entries = load_manifest(folder / "manifest.json").by_precision()
    ok = True
    for precision in ("Q8_0", "Q4_K_M"):
        entry = entries.get(precision)
        ver = (entry.verification if entry else None) or {}
        if entry is None or not ver.get("generated_tokens") or not (folder / entry.name).is_file():
            res.done_when.append(f"{precision}: MISSING or unverified in {folder / 'manifest.json'}")
            ok = False
            continue
        res.done_when.append(
            f"`{entry.name}`: {entry.bytes / 1e6:.1f} MB, {entry.tensor_count} tensors, "
            f"architecture {entry.architecture}, file_type {entry.file_type}, verification runtime "
            f"{ver.get('runtime')}, {len(ver['generated_tokens'])} tokens generated"
        )
    files = [str(folder / entries[p].name) for p in ("Q8_0", "Q4_K_M") if p in entries]
    try:
        measure("cecai-convert verify (CPU pair, Q8_0 + Q4_K_M)", cli_argv("verify", *files), log)
        res.done_when.append("`cecai-convert verify` on both files again (read-back + load + generate): exit 0")
    except BenchError as exc:
        res.done_when.append(f"`cecai-convert verify` FAILED: {exc}")
        ok = False
    res.done_when.append("result: " + ("PASS" if ok else "FAIL"))


# -- report --------------------------------------------------------------------------------------------------------
def _sum(runs: Sequence[Measured]) -> float:
    return sum(r.wall_s for r in runs)


def _peak(runs: Sequence[Measured]) -> int:
    return max((r.maxrss_bytes for r in runs), default=0)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _verdict(value: float, goal: float, lower_is_better: bool = True) -> str:
    met = value <= goal if lower_is_better else value >= goal
    return "met" if met else "**not met**"


def machine_line() -> str:
    """nproc, RAM, CPU model, Python, the pinned llama-cpp-python."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {ram / 2**30:.1f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"
    )


def report(res: Results, args: argparse.Namespace, command: str) -> str:
    """The Markdown summary: only figures measured in this invocation."""
    rows: list[tuple[str, str, str, str]] = []
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min) at the end"
    lines: list[str] = []
    if res.a_pipe is not None:
        raw = _sum(res.a_raw)
        ratio = res.a_pipe.wall_s / raw
        t = res.a_manifest
        verify = sum(t.seconds("verify_s").values())
        steps = (t.total_seconds("convert_s") or 0.0) + sum(t.seconds("quantize_s").values())
        rows.append(
            (
                "(a) pipeline / tools by hand, convert + Q8_0 + Q4_K_M",
                f"{res.a_pipe.wall_s:.1f} s / {raw:.1f} s = **{ratio:.2f}**",
                "<= 1.10",
                _verdict(ratio, GOALS["a"]),
            )
        )
        no_verify = res.a_pipe.wall_s - verify
        rows.append(
            (
                "(a') same, pipeline without its verification step",
                f"{no_verify:.1f} s / {raw:.1f} s = **{no_verify / raw:.2f}**",
                "(<= 1.10)",
                _verdict(no_verify / raw, GOALS["a"]),
            )
        )
        if len(res.a_raw_totals) > 1:
            med_raw, med_pipe = statistics.median(res.a_raw_totals), statistics.median(res.a_pipe_totals)
            lines += [
                f"(a) {len(res.a_raw_totals)} repeats, alternating order; the table keeps the fastest of each side. "
                f"By hand: {', '.join(f'{x:.1f}' for x in res.a_raw_totals)} s; pipeline: "
                f"{', '.join(f'{x:.1f}' for x in res.a_pipe_totals)} s. Medians: {med_pipe:.1f} s / {med_raw:.1f} s "
                f"= **{med_pipe / med_raw:.2f}** (the fastest-of-each ratio favours whichever side caught a quiet "
                "moment; on a shared machine read both).",
                "",
            ]
        lines += [
            "(a) details, wall seconds (fastest repeat of each side):",
            "",
            "| step | by hand | pipeline (manifest timings) |",
            "|---|---:|---:|",
            f"| convert to bf16 | {res.a_raw[0].wall_s:.1f} | {float(t.get('convert_s', 0)):.1f} |",
        ]
        for run, p in zip(res.a_raw[1:], JOB_A, strict=True):
            lines.append(f"| quantize {p} | {run.wall_s:.1f} | {float((t.get('quantize_s') or {}).get(p, 0)):.1f} |")
        for p, s in (t.get("verify_s") or {}).items():
            lines.append(f"| verify {p} (load + generate) | - | {float(s):.1f} |")
        other = res.a_pipe.wall_s - steps - verify
        lines += [
            f"| everything else (CLI start, source checks and hashing, sha256 of outputs, publish) | - | {other:.1f} |",
            f"| **total (wall)** | **{raw:.1f}** | **{res.a_pipe.wall_s:.1f}** |",
            "",
        ]
    if res.b_pipe is not None:
        if res.b_old:
            old = _sum(res.b_old) * res.b_old_factor
            ratio = res.b_pipe.wall_s / old
            how = (
                "full old way, 12 conversions + 12 quantizations, all timed"
                if res.b_old_mode == "full"
                else f"EXTRAPOLATED: one pair (3 conversions + 3 quantizations, {_sum(res.b_old):.1f} s) timed, "
                f"x{res.b_old_factor}"
            )
            rows.append(
                (
                    f"(b) pipeline / old way, 4 pairs x {', '.join(JOB_B)} ({how})",
                    f"{res.b_pipe.wall_s:.1f} s / {old:.1f} s = **{ratio:.2f}**",
                    "<= 0.30",
                    _verdict(ratio, GOALS["b"]),
                )
            )
        else:
            rows.append(
                (
                    "(b) pipeline, 4 pairs x 3 precisions (old way skipped)",
                    f"{res.b_pipe.wall_s:.1f} s",
                    "<= 0.30",
                    "not measured",
                )
            )
    if res.c_rerun is not None:
        said = "said 'up to date'" if res.c_said_up_to_date else "did NOT say 'up to date'"
        rows.append(
            (
                f"(c) unchanged re-run of (b), whole CLI command ({said})",
                f"**{res.c_rerun.wall_s:.2f} s**",
                "< 2 s",
                _verdict(res.c_rerun.wall_s, GOALS["c"]),
            )
        )
    if res.a_pipe is not None:
        conv = res.a_raw[0].maxrss_bytes
        pipe_peak = max(res.a_pipe.maxrss_bytes, res.b_pipe.maxrss_bytes if res.b_pipe else 0)
        rows.append(
            (
                "(d) peak RSS: pipeline (max of (a), (b); itself + converter + quantizer + verify children) "
                "/ converter run by hand",
                f"{_gib(pipe_peak)} / {_gib(conv)} = **{pipe_peak / conv:.2f}**",
                "(no goal; ~1)",
                "-",
            )
        )
        lines += [
            "(d) details, peak RSS of each command with its descendants:",
            "",
            f"- converter by hand (bf16): {_gib(conv)}; quantizer by hand: "
            + ", ".join(f"{p} {_gib(r.maxrss_bytes)}" for p, r in zip(JOB_A, res.a_raw[1:], strict=True)),
            f"- pipeline (a) `convert`: {_gib(res.a_pipe.maxrss_bytes)}"
            + (f"; pipeline (b) `run`, 4 pairs: {_gib(res.b_pipe.maxrss_bytes)}" if res.b_pipe else "")
            + (f"; re-run (c): {_gib(res.c_rerun.maxrss_bytes)}" if res.c_rerun else ""),
            "- getrusage reports the largest single process in the tree, so the pipeline's figure is its converter "
            "child's peak unless another step (quantizer, verification load) or the CLI process itself is larger.",
            "",
        ]
    if res.b_old:
        lines += ["(b) old way, per step (wall s):", "", "| pair, precision | convert | quantize |", "|---|---:|---:|"]
        for conv, quant in zip(res.b_old[::2], res.b_old[1::2], strict=True):
            name = conv.label.removeprefix("old way ").split(":")[0]
            lines.append(f"| {name} | {conv.wall_s:.1f} | {quant.wall_s:.1f} |")
        lines.append("")

    head = [
        "# Benchmark: cecai-convert pipeline vs llama.cpp tools by hand",
        "",
        f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine_line()}",
        f"- model: random-weight Llama, size `{args.size}`, {res.n_params / 1e9:.3f} B parameters, "
        f"{res.model_bytes / 1e9:.2f} GB on disk (bf16 safetensors)",
        f"- threads for quantization and verification: {args.threads} (both sides)",
        f"- command: `{command}`",
        f"- (a): {args.repeats} run(s) of each side; (b), (c): one run. The machine is shared with other work (load "
        f"average {load}), so wall times are noisy.",
        "",
        "| figure | measured | goal | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    tail: list[str] = []
    if res.done_when:
        tail += [
            "Issue 2 'Done when': `cecai-convert run` on the seed layout (4 pairs, this model) made loadable, verified "
            "files for CPU_LLM_LLAMA:",
            "",
            *[f"- {line}" for line in res.done_when],
            "",
        ]
    if res.notes:
        tail += ["Notes:", "", *[f"- {n}" for n in res.notes], ""]
    return "\n".join(head + lines + tail)


#: The hand-written section at the end of results.md; a rerun replaces the measured part above it and keeps it.
SUMMARY_HEADING = "## Summary and reading the figures"


def _kept_summary(results: Path) -> str:
    """The hand-written summary of ``results`` (from its heading to the end), or "" when there is none."""
    try:
        old = results.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    at = old.find(SUMMARY_HEADING)
    return "" if at < 0 else "\n" + old[at:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1gb", help="model size (default 1gb)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new folder under /tmp)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both sides")
    parser.add_argument(
        "--old-way",
        choices=("full", "estimate", "skip"),
        default="full",
        help="(b) baseline: all 12 convert+quantize runs, one pair x4 (extrapolated), or none",
    )
    parser.add_argument("--skip-old-way", action="store_const", const="skip", dest="old_way", help="= --old-way skip")
    parser.add_argument(
        "--repeats", type=int, default=1, help="(a): run both sides N times, alternating, keep the fastest of each"
    )
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results.md", help="where to write the table")
    parser.add_argument("--keep-files", action="store_true", help="keep the model and outputs in the workdir")
    args = parser.parse_args(argv)

    command = "python benchmarks/bench_pipeline.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="cecai-bench-", dir="/tmp"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    print(f"workdir {work} (tool output in {log})")
    res = Results()
    try:
        converter_dir = ensure_converter()
        model = ensure_model(work, args.size)
        res.model_bytes = folder_bytes(model)
        res.n_params = count_params(model)
        print(f"model: {res.n_params / 1e9:.3f} B parameters, {res.model_bytes / 1e9:.3f} GB on disk")
        if args.size == "1gb" and res.model_bytes < 1e9:
            res.notes.append(f"the model is {res.model_bytes / 1e9:.2f} GB, under the 1 GB the issue asks for")
        bench_a(res, converter_dir, model, work, args.threads, log, args.repeats)
        converter = bench_b(res, converter_dir, model, work, args.threads, log, args.old_way)
        check_done_when(res, converter, log)
    except BenchError as exc:
        res.notes.append(f"stopped early: {exc}")
        print(f"error: {exc}", file=sys.stderr)
    finally:
        text = report(res, args, command)
        print("\n" + text)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text + _kept_summary(args.results))
        print(f"wrote {args.results}")
        if not args.keep_files:
            for child in ("Bench", "a-raw", "a-pipeline", "b-old", f"model-{args.size}"):
                shutil.rmtree(work / child, ignore_errors=True)
            (work / f".model-{args.size}.built").unlink(missing_ok=True)
    return 1 if res.notes and any(n.startswith("stopped early") for n in res.notes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
