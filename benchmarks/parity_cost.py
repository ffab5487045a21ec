"""Benchmark: what the source check costs, as a ratio of the conversion time (issue 15, "Done when": goal <= 0.5).

A script, not a test. It builds a random-weight Llama model locally (``--size 1gb``: 0.55 B parameters, 1.1 GB of
bf16 safetensors; ``small`` and ``tiny`` for a quick look; nothing is downloaded), converts it once with
``cecai-convert convert MODEL --precision BF16 --no-fidelity --no-reference`` (the base is the whole job, so the
conversion is one converter run) twice: with ``--no-source-check`` and with the check. The cost is what the check
adds to the whole command (its transformers side runs while the converter writes the base, so the step after the
conversion is not all of it), as a ratio of the conversion time without it (``convert_s``). It also prints each
side's time, the parity record's numbers, the machine and its load (the 1-minute load average before and after:
on a machine shared with other work the two sides and the converter compete with it, and the ratio shows it).

    python benchmarks/parity_cost.py [--size 1gb|small|tiny] [--workdir DIR] [--threads N] [--keep-files]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cecai_converter.modelgen import SIZES, build_model

GOAL = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="1gb")
    parser.add_argument("--workdir", type=Path, help="where to build and convert (default: a temporary folder)")
    parser.add_argument("--threads", type=int, help="threads for the converter's tools, torch and llama.cpp")
    parser.add_argument("--keep-files", action="store_true", help="leave the model and the GGUF in --workdir")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cecai-parity-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"bench-llama-{args.size}"
    try:
        if not (model / "config.json").is_file():
            t0 = time.perf_counter()
            build_model(model, "llama", dtype="bfloat16", size=args.size)
            print(f"built {model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        env = {**os.environ, "CECAI_NO_PROGRESS": "1"}

        def convert(*extra: str) -> tuple[float, dict[str, object]]:
            outdir = work / ("out" + "".join(extra))
            shutil.rmtree(outdir, ignore_errors=True)
            cmd = [sys.executable, "-m", "cecai_converter", "convert", str(model), "--precision", "BF16",
                   "--outdir", str(outdir), "--no-fidelity", "--no-reference", "--force", *extra]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
            return wall, json.loads((outdir / "manifest.json").read_text())

        load_before = os.getloadavg()[0]
        wall_off, manifest_off = convert("--no-source-check")
        wall_on, manifest = convert()
        timings, parity = manifest["timings"], manifest["source_parity"]
        assert isinstance(timings, dict) and isinstance(parity, dict)
        convert_off = float(manifest_off["timings"]["convert_s"])  # type: ignore[index]
        convert_on, step = float(timings["convert_s"]), float(timings["source_check_s"])
        logits, sides = parity.get("logits") or {}, parity.get("timings") or {}
        added = wall_on - wall_off
        ratio = added / convert_off
        print(f"machine          : {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"load average     : {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 minute)")
        print(f"model            : {args.size}, {weights / 1e9:.2f} GB of bf16 safetensors")
        print(f"conversion       : {convert_off:.1f} s without the check (convert_s), {convert_on:.1f} s with it "
              "(the source side runs alongside)")  # fmt: skip
        print(
            f"check            : transformers side {sides.get('source_s')} s (mostly during the conversion), "
            f"llama.cpp side {sides.get('gguf_s')} s; the step after the conversion {step:.1f} s"
        )
        print(f"whole command    : {wall_off:.1f} s without, {wall_on:.1f} s with: the check adds {added:.1f} s")
        print(
            f"ratio            : {ratio:.2f} of the conversion time (goal <= {GOAL}) "
            f"{'met' if ratio <= GOAL else 'NOT met'}"
        )
        print(
            f"parity           : passed={parity.get('passed')}, NMSE {logits.get('nmse')}, "
            f"KLD {logits.get('kld_mean')}, top-1 {logits.get('top1_agreement')}, {logits.get('n_tokens')} tokens"
        )
        return 0
    finally:
        if not args.keep_files and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
