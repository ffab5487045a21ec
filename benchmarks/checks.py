"""Benchmark: what the checks cost as the work grows (issue 17, "A benchmark that reports cost as work grows").

A script, not a test. For each ``--size`` it builds a random-weight Llama model here (bf16 safetensors, the same
builder as the other benchmarks: ``1gb`` is 0.55 B parameters, ``3b`` is 3.2 B; nothing is downloaded) and runs
``cecai-convert convert MODEL --precision Q8_0 --precision Q4_K_M --precision Q2_K`` in these modes (``--modes``):

* ``default``: the command as users run it (source check, verification, fidelity at the default target,
  reference.json).
* ``nochecks``: the same with ``--no-fidelity --no-reference``; the report gives default / nochecks (the issue's
  goal: at most 1.5 on the 1gb model).
* ``whole``: fidelity on the whole text (``--fidelity-tokens all``, when this version has the option): the
  default target's KL-divergence means are compared with these, within their error bars.
* ``checkjob``: the same with ``--fidelity-on check`` (the release flow's check job measures fidelity, on a GPU
  where the plan has one): what the builder still pays, against ``nochecks``.
* ``concurrent``: two default runs (two output folders) one after the other, then the same two at once; the
  report gives both wall times (the issue's goal: at once no slower than one after the other).
* ``omp``: the two runs at once again under the thread policies that came before (``CECAI_CORE_SLOTS=off``: each
  worker takes every core; with ``OMP_WAIT_POLICY=ACTIVE`` too: OpenMP threads spin while they wait), to show
  what the core lease and the passive wait policy change.

The runs of one invocation lease cores among themselves (``CECAI_CORE_SLOTS`` is ``WORKDIR/core-slots`` unless
set): other processes of the same user on the machine do not make them wait. Every run gets a fresh
``XDG_CACHE_HOME`` (fidelity's cache of the base's evaluation does not carry over from one run to the next; the
toolchain stays where it is, ``CECAI_TOOLCHAIN_DIR``). Each run is watched every 0.25 s:
its process tree's resident memory (the sum over the tree, not the largest process), the bytes under its output
folder (staging included) and its fidelity cache, and which stage is running (by the child's command line: the
converter, the source check's workers, the quantizer, verify, fidelity, reference). Per stage the report gives
the manifest's seconds, the seconds the stage was seen running, its peak RSS and the peak disk while it ran.

The machine's load is printed before and after; a run on a busy machine says so in the results.

    python benchmarks/checks.py [--size 1gb] [--size 3b] [--modes default,nochecks,whole,checkjob,concurrent,omp]
                                [--workdir DIR] [--precisions Q8_0,Q4_K_M,Q2_K] [--results benchmarks/results.md]
                                [--keep-files]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cecai_converter.manifest import Manifest, load_manifest
from cecai_converter.modelgen import SIZES, build_model
from cecai_converter.option_table import OPTIONS
from cecai_converter.toolchain import cache_root

BENCH_DIR = Path(__file__).resolve().parent
MODEL_NAME = "bench-llama"
PRECISIONS = ("Q8_0", "Q4_K_M", "Q2_K")
MODES = ("default", "nochecks", "whole", "checkjob", "concurrent", "omp")
GOALS = {"ratio": 1.5, "concurrent": 1.0}
SECTION_BEGIN = "<!-- checks benchmark: written by benchmarks/checks.py -->"
SECTION_END = "<!-- end of checks benchmark -->"
#: Which stage a child process is, from its command line (first match wins).
STAGES: tuple[tuple[str, str], ...] = (
    ("convert_hf_to_gguf", "convert"),
    ("cecai_converter.source_parity", "source check"),
    ("llama-imatrix", "imatrix"),
    ("cecai_converter.quantize", "quantize"),
    ("cecai_converter.verify", "verify"),
    ("cecai_converter.fidelity", "fidelity"),
    ("cecai_converter.agreement", "reference"),
    ("cecai_converter.multimodal", "image check"),
)
_SAMPLE_S = 0.25
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: The thread policies of the ``omp`` mode: label → variables for both runs.
POLICIES: dict[str, dict[str, str]] = {
    "core lease + passive wait (this version)": {},
    "no lease, passive wait": {"CECAI_CORE_SLOTS": "off"},
    "no lease, spinning wait (before issue 17)": {"CECAI_CORE_SLOTS": "off", "OMP_WAIT_POLICY": "ACTIVE"},
}


# -- watching a process tree ---------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _bytes_under(folders: Sequence[Path]) -> int:
    total = 0
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                with contextlib.suppress(OSError):
                    total += (Path(dirpath) / name).lstat().st_blocks * 512
    return total


@dataclass
class Watch:
    """What one run was seen doing: per stage, seconds seen, peak RSS (tree) and peak disk."""

    seen_s: dict[str, float] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)
    peak_rss: int = 0
    peak_disk: int = 0


def _watch(root: int, folders: Sequence[Path], watch: Watch, stop: threading.Event) -> None:
    while not stop.wait(_SAMPLE_S):
        pids = _tree(root)
        rss = sum(_rss(p) for p in pids)
        disk = _bytes_under(folders)
        stages = {next((s for key, s in STAGES if key in _cmdline(p)), "") for p in pids[1:]} - {""}
        for stage in stages or {"other (CLI, hashing, read-back)"}:
            watch.seen_s[stage] = watch.seen_s.get(stage, 0.0) + _SAMPLE_S
            watch.rss[stage] = max(watch.rss.get(stage, 0), rss)
            watch.disk[stage] = max(watch.disk.get(stage, 0), disk)
        watch.peak_rss, watch.peak_disk = max(watch.peak_rss, rss), max(watch.peak_disk, disk)


# -- one run -------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    label: str
    wall_s: float
    manifest: Manifest
    watch: Watch


class BenchError(RuntimeError):
    """A measured command failed; the message names its log."""


def start(label: str, model: Path, work: Path, precisions: Sequence[str], extra: Sequence[str],
          env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], Path, Path, Path]:  # fmt: skip
    """Start one ``convert`` (fresh output folder and cache); its process, output folder, cache and log."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    outdir, cache, log = work / f"out-{slug}", work / f"cache-{slug}", work / f"{slug}.log"
    for folder in (outdir, cache):
        shutil.rmtree(folder, ignore_errors=True)
    cache.mkdir(parents=True)
    argv = [sys.executable, "-m", "cecai_converter", "convert", str(model), "--outdir", str(outdir),
            "--model-name", MODEL_NAME, *[a for p in precisions for a in ("--precision", p)], *extra]  # fmt: skip
    # The runs of this benchmark lease cores among themselves (threads.py), not with other users of the machine.
    child_env = {**os.environ, "CECAI_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "CECAI_TOOLCHAIN_DIR": str(cache_root()), "XDG_CACHE_HOME": str(cache),
                 "CECAI_CORE_SLOTS": os.environ.get("CECAI_CORE_SLOTS") or str(work / "core-slots"), **env}  # fmt: skip
    with log.open("w") as fh:
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env)
    return proc, outdir, cache, log


def run_many(jobs: Sequence[tuple[str, Sequence[str], Mapping[str, str]]], model: Path, work: Path,
             precisions: Sequence[str]) -> tuple[float, list[Run]]:  # fmt: skip
    """Run ``jobs`` (label, extra flags, variables) at the same time; the wall time of all and each run."""
    print(f"  running {', '.join(j[0] for j in jobs)} ...", flush=True)
    t0 = time.perf_counter()
    started = []
    for label, extra, env in jobs:
        proc, outdir, cache, log = start(label, model, work, precisions, extra, env)
        watch, stop = Watch(), threading.Event()
        thread = threading.Thread(target=_watch, args=(proc.pid, [outdir, cache], watch, stop), daemon=True)
        thread.start()
        started.append((label, proc, outdir, log, watch, stop, thread))
    runs = []
    for label, proc, outdir, log, watch, stop, thread in started:
        code = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        thread.join()
        if code != 0:
            raise BenchError(f"{label} failed (exit {code}); see {log}")
        runs.append(Run(label, wall, load_manifest(outdir / "manifest.json"), watch))
        print(f"    {label}: {wall:8.1f} s   peak RSS {watch.peak_rss / 2**30:.2f} GiB   peak disk "
              f"{watch.peak_disk / 2**30:.2f} GiB", flush=True)  # fmt: skip
    return time.perf_counter() - t0, runs


# -- the report ------------------------------------------------------------------------------------------------------
def _sum(value: object) -> float | None:
    if isinstance(value, dict):
        return sum(float(v) for v in value.values() if isinstance(v, (int, float))) or None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stage_rows(run: Run) -> list[str]:
    """Markdown rows: stage, manifest seconds, seconds seen, peak RSS, peak disk."""
    timings = run.manifest.timings or {}
    parity = (run.manifest.source_parity or {}).get("timings") or {}
    manifest_s = {
        "convert": _sum(timings.get("convert_s")), "source check": _sum(parity.get("total_s")),
        "imatrix": _sum(timings.get("imatrix_s")), "quantize": _sum(timings.get("quantize_s")),
        "verify": _sum(timings.get("verify_s")), "fidelity": _sum(timings.get("fidelity_s")),
        "reference": _sum(timings.get("reference_s")),
    }  # fmt: skip
    rows = []
    for stage in [*manifest_s, *sorted(set(run.watch.seen_s) - set(manifest_s))]:
        m, seen = manifest_s.get(stage), run.watch.seen_s.get(stage)
        if m is None and seen is None:
            continue
        rss, disk = run.watch.rss.get(stage), run.watch.disk.get(stage)
        gib = ["" if v is None else f"{v / 2**30:.2f}" for v in (rss, disk)]
        cells = ["" if m is None else f"{m:.1f}", "" if seen is None else f"{seen:.1f}", *gib]
        rows.append(f"| {stage} | {' | '.join(cells)} |")
    rows.append(f"| **whole command** | {_sum(timings.get('total_s')) or 0:.1f} | {run.wall_s:.1f} (wall) | "
                f"{run.watch.peak_rss / 2**30:.2f} | {run.watch.peak_disk / 2**30:.2f} |")  # fmt: skip
    return rows


def fidelity_rows(default: Run, whole: Run | None) -> list[str]:
    """Markdown rows: per precision, KLD mean ± se, top-1 ± se and positions, at the default target and on the whole
    text, and whether the default's mean is within its error bar of the whole text's."""
    whole_by = {e.precision: e.fidelity or {} for e in (whole.manifest.files if whole else [])}
    rows = []
    for entry in default.manifest.files:
        f, w = entry.fidelity or {}, whole_by.get(entry.precision, {})

        def bar(d: Mapping[str, Any], key: str, between: str) -> float:
            """The error a reader should trust: llama-perplexity's per-position one or, when larger, the one
            between chunks (fidelity.chunk_se)."""
            return float(max(d.get(key) or 0.0, (d.get("budget") or {}).get(between) or 0.0))

        def cell(d: Mapping[str, Any]) -> str:
            if not d:
                return "–"
            kld = f"{d.get('kld_mean', 0):.4g} ± {bar(d, 'kld_mean_se', 'kld_mean_se_chunks'):.2g}"
            top1 = f"{d.get('top1_agreement', 0):.3f} ± {bar(d, 'top1_agreement_se', 'top1_agreement_se_chunks'):.3f}"
            chunks = (d.get("budget") or {}).get("chunks")
            return f"{kld} · top-1 {top1} · {d.get('n_tokens')} pos" + (f" ({chunks} chunks)" if chunks else "")

        within = ""
        if f and w:
            gap, se = abs(f["kld_mean"] - w["kld_mean"]), bar(f, "kld_mean_se", "kld_mean_se_chunks")
            sigmas = gap / se if se > 0 else math.inf
            within = (f"yes ({sigmas:.1f} se)" if sigmas <= 2 else f"**no** ({sigmas:.1f} se)") if gap > 0 else "equal"
        rows.append(f"| {entry.precision} | {cell(f)} | {cell(w)} | {within} |")
    return rows


def machine_line(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")),
               "0")  # fmt: skip
    cores = os.cpu_count() or 1
    # The load after includes the benchmark's own (up to one per core): only more than that is someone else's.
    busy = load_before[0] > 0.5 * cores or load_after[0] > 1.5 * cores
    note = " — **a busy machine: times are inflated and noisy**" if busy else ""
    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {int(mem) / 2**20:.1f} GiB RAM, "
            f"Python {platform.python_version()}; load average before {load_before[0]:.2f} / after "
            f"{load_after[0]:.2f} (1 min){note}")  # fmt: skip


def together(size: str, model: Path, work: Path, precisions: Sequence[str], *, omp: bool) -> list[str]:
    """Two default runs one after the other, then at once (under each thread policy with ``omp``): Markdown."""
    lines: list[str] = []
    one_after = [run_many([(f"{size} sequential {i}", [], {})], model, work, precisions)[0] for i in (1, 2)]
    sequential = sum(one_after)
    lines += [f"Two default runs one after the other: {one_after[0]:.1f} + {one_after[1]:.1f} = "
              f"**{sequential:.1f} s**.", "", "| the same two at once | wall s | / one after the other |",
              "|---|---:|---:|"]  # fmt: skip
    policies = POLICIES if omp else dict(list(POLICIES.items())[:1])
    for policy, env in policies.items():
        wall, _runs = run_many([(f"{size} together {policy} {i}", [], env) for i in (1, 2)], model, work, precisions)
        goal = " (goal ≤ 1)" if not env else ""
        lines.append(f"| {policy} | {wall:.1f} | {wall / sequential:.2f}{goal} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", choices=tuple(SIZES), help="model size (repeat; default 1gb)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--workdir", type=Path, help="where models and outputs go (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results.md", help="'' to print only")
    parser.add_argument("--keep-files", action="store_true", help="leave models and outputs in --workdir")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if "whole" in modes and "fidelity_tokens" not in {s.name for s in OPTIONS}:
        print("this version has no --fidelity-tokens: the whole-text mode is left out", file=sys.stderr)
        modes.remove("whole")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cecai-checks-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    lines: list[str] = []
    try:
        for size in args.size or ["1gb"]:
            model = work / f"{MODEL_NAME}-{size}"
            if not (model / "config.json").is_file():
                print(f"building the {size} model in {model} ...", flush=True)
                build_model(model, "llama", size=size, dtype="bfloat16", seed=0)
            weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
            lines += [f"### {size} model: {weights / 1e9:.2f} GB of bf16 safetensors", ""]
            runs: dict[str, Run] = {}
            for mode, extra in (("default", []), ("nochecks", ["--no-fidelity", "--no-reference"]),
                                ("whole", ["--fidelity-tokens", "all"]),
                                ("checkjob", ["--fidelity-on", "check"])):  # fmt: skip
                if mode in modes:
                    try:
                        runs[mode] = run_many([(f"{size} {mode}", extra, {})], model, work, precisions)[1][0]
                    except BenchError as exc:  # the other modes still run; the results say what failed
                        lines += [f"`{mode}`: **failed**: {exc}", ""]
            if "default" in runs:
                n_params = next((e.n_params for e in runs["default"].manifest.files if e.n_params), None)
                lines += [f"Parameters: {n_params / 1e9:.2f} B." if n_params else "", ""]
            for mode, run in runs.items():
                flags = {"nochecks": " --no-fidelity --no-reference", "whole": " --fidelity-tokens all",
                         "checkjob": " --fidelity-on check"}.get(mode, "")  # fmt: skip
                lines += [f"`{mode}` (`convert {' '.join('--precision ' + p for p in precisions)}{flags}`):", "",
                          "| stage | manifest s | seen running s | peak RSS GiB (tree) | peak disk GiB |",
                          "|---|---:|---:|---:|---:|", *stage_rows(run), ""]  # fmt: skip
            if "default" in runs and "nochecks" in runs:
                ratio = runs["default"].wall_s / runs["nochecks"].wall_s
                verdict = "met" if ratio <= GOALS["ratio"] else "**not met**"
                walls = f"{runs['default'].wall_s:.1f} s / {runs['nochecks'].wall_s:.1f} s"
                lines += [f"**default / `--no-fidelity --no-reference`: {walls} = {ratio:.2f}** "
                          f"(goal ≤ {GOALS['ratio']}: {verdict})", ""]  # fmt: skip
            if "checkjob" in runs and "nochecks" in runs:
                ratio = runs["checkjob"].wall_s / runs["nochecks"].wall_s
                walls = f"{runs['checkjob'].wall_s:.1f} s / {runs['nochecks'].wall_s:.1f} s"
                lines += [f"`--fidelity-on check` / `--no-fidelity --no-reference` on the builder: {walls} = "
                          f"{ratio:.2f} (fidelity is then measured by the check job)", ""]  # fmt: skip
            if "default" in runs:
                lines += ["Fidelity (KL-divergence mean ± its standard error, top-1 agreement ± se, positions):", "",
                          "| precision | default target | whole text | default within 2 se of the whole text |",
                          "|---|---|---|---|", *fidelity_rows(runs["default"], runs.get("whole")), ""]  # fmt: skip
            if "concurrent" in modes or "omp" in modes:
                try:
                    lines += together(size, model, work, precisions, omp="omp" in modes)
                except BenchError as exc:
                    lines += [f"Two runs at once: **failed**: {exc}", ""]
    finally:
        if not args.keep_files and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    header = [
        SECTION_BEGIN, "", "## Checks: what verification, fidelity and reference.json cost (benchmarks/checks.py)", "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_line(load_before, os.getloadavg())}",
        f"- command: `python benchmarks/checks.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "- stage seconds: the manifest's timings and the seconds the stage's process was seen running (sampled every "
        "0.25 s); peak RSS is the whole process tree's, peak disk the output folder (staging included) and the "
        "fidelity cache", "",
    ]  # fmt: skip
    text = "\n".join([*header, *lines, SECTION_END]) + "\n"
    print(text)
    if str(args.results):
        old = args.results.read_text(encoding="utf-8") if args.results.is_file() else ""
        if SECTION_BEGIN in old and SECTION_END in old:
            old = old[: old.index(SECTION_BEGIN)] + old[old.index(SECTION_END) + len(SECTION_END) + 1 :]
        args.results.write_text(old.rstrip("\n") + "\n\n" + text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
