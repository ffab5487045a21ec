"""The core commands: ``run``, ``convert``, ``precisions``, ``verify``, ``toolchain`` and ``demo``.

Handlers translate arguments into pipeline calls and print results; they decide nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .check import default_gpu_layers
from .config import PairJob, check_writable_dir, load_converter_dir
from .errors import EXIT_FAILED, EXIT_OK, ConverterError, UsageError
from .manifest import MANIFEST_NAME, read_manifest
from .names import check_stem, show
from .output import Output
from .pairs import PairInfo, parse_pair
from .pipeline import Job, Options, Target, run_job
from .precisions import PRECISIONS, parse_precisions
from .source import check_repo_id, looks_like_repo_id
from .toolchain import installed_runtime_version
from .tools import thread_count

__all__ = ["register"]


# -- shared options ------------------------------------------------------------------------------------------------
def _add_conversion_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion")
    g.add_argument("--force", action="store_true", help="redo the work even when the outputs are current")
    g.add_argument("--keep-base", action="store_true", default=None, help="also publish the unquantized base file")
    g.add_argument(
        "--threads", type=thread_count, help="threads for quantization and verification (default: all cores)"
    )
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="accept pickle .bin weights (unpickling runs code from the file: only for models you trust)",
    )
    g.add_argument(
        "--imatrix",
        metavar="FILE|auto",
        help="importance matrix for quantization (needed by IQ* types): a file, or `auto` to compute one with "
        "llama-imatrix on the calibration text",
    )
    g.add_argument(
        "--calibration-text", type=Path, help="text to compute the importance matrix from (default: shipped text)"
    )
    g.add_argument(
        "--fidelity",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure KL-divergence and perplexity of every file against the base (default: on)",
    )
    g.add_argument("--eval-text", type=Path, help="the text fidelity is measured on (default: shipped text)")
    g.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write reference.json: this runtime's predictions for each file, which `cecai-convert check` compares "
        "other runtimes against (default: on for convert, off for run)",
    )
    g.add_argument(
        "--n-gpu-layers",
        type=int,
        help="layers to offload when verifying/measuring (default: all on GPU pairs when the runtime has a GPU, "
        "else 0)",
    )


def _gpu_layers(args: argparse.Namespace, pair: PairInfo | None, out: Output) -> int:
    if args.n_gpu_layers is not None:
        return int(args.n_gpu_layers)
    layers = default_gpu_layers(pair)
    if layers != 0 or pair is None or not pair.gpu or installed_runtime_version() is None:
        return layers
    out.warning(
        f"{pair.name} is a GPU pair but this llama-cpp-python has no GPU support: verifying on the CPU "
        "(use the pair's image, --backend docker, to verify on its runtime)"
    )
    return 0


def _fidelity_default() -> bool:
    try:
        from . import fidelity  # noqa: F401  (present once the fidelity module is installed)
    except ImportError:
        return False
    return True


def _options(
    args: argparse.Namespace,
    settings: dict[str, Any],
    n_gpu_layers: int,
    config_dir: Path | None,
    *,
    reference: bool = False,
) -> Options:
    def path_of(flag: Path | None, key: str) -> Path | None:
        if flag is not None:
            return flag.resolve()
        value = settings.get(key)
        return (config_dir / str(value)).resolve() if value is not None and config_dir is not None else None

    def flag_or(flag: bool | None, key: str, default: bool) -> bool:
        if flag is not None:
            return bool(flag)
        value = settings.get(key)
        return default if value is None else bool(value)

    imatrix_value = args.imatrix if args.imatrix is not None else settings.get("IMATRIX")
    compute_imatrix = str(imatrix_value).strip().lower() == "auto"
    if imatrix_value is None or compute_imatrix:
        imatrix = None
    elif args.imatrix is not None:
        imatrix = Path(args.imatrix).resolve()
    else:
        imatrix = path_of(None, "IMATRIX")
    return Options(
        force=bool(args.force),
        keep_base=flag_or(args.keep_base, "KEEP_BASE", False),
        threads=args.threads,
        allow_pickle=flag_or(args.allow_pickle, "ALLOW_PICKLE", False),
        imatrix=imatrix,
        compute_imatrix=compute_imatrix,
        calibration_text=path_of(args.calibration_text, "CALIBRATION_TEXT"),
        fidelity=flag_or(args.fidelity, "FIDELITY", _fidelity_default()),
        eval_text=path_of(args.eval_text, "EVAL_TEXT"),
        thresholds=settings.get("THRESHOLDS") or {},
        n_gpu_layers=n_gpu_layers,
        reference=reference if args.reference is None else bool(args.reference),
    )


def _file_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    folder = Path(manifest["manifest_path"]).parent if "manifest_path" in manifest else None
    rows = []
    for entry in manifest.get("files", []):
        row = dict(entry)
        if folder is not None:
            row["path"] = str(folder / entry["name"])
        rows.append(row)
    return rows


def _human_table(manifests: Sequence[dict[str, Any]]) -> str:
    lines = []
    for manifest in manifests:
        head = manifest.get("pair") or "output"
        lines.append(f"{head}: {manifest.get('manifest_path', '')}")
        for row in _file_rows(manifest):
            fid = row.get("fidelity") or {}
            kld = f"  kld={fid['kld_mean']:.5f}" if isinstance(fid.get("kld_mean"), (int, float)) else ""
            lines.append(
                f"  {row['name']:<40} {row['precision']:<7} {row['bytes'] / 1e6:>9.1f} MB  "
                f"sha256 {row['sha256'][:12]}  verified {'yes' if row.get('verification') else 'no'}{kld}"
            )
    return "\n".join(lines)


# -- run -----------------------------------------------------------------------------------------------------------
def _group_key(job: PairJob) -> tuple[Any, ...]:
    settings = {k: v for k, v in job.settings.items() if k not in ("PRECISION", "IMAGE_NAME")}
    return (str(job.model_dir), job.model_name, repr(sorted(settings.items())))


def _cmd_run(args: argparse.Namespace, out: Output) -> int:
    overrides = {
        key: value
        for key, value in (
            ("MODELS_PATH", args.models_path),
            ("OUTPUTS_PATH", args.outputs_path),
            ("LOGS_PATH", args.logs_path),
        )
        if value is not None
    }
    jobs = load_converter_dir(args.converter_dir, args.pair, path_overrides=overrides)
    if args.backend == "docker":
        from .backends.docker import run_jobs

        # Containers print for people (to stderr); the result, one document for all pairs, comes from the
        # manifests they left on this machine, with this machine's paths.
        run_jobs(jobs, image=args.image, forward_args=_forward_args(args), out=_to_stderr(out))
        _print_results([_manifest_of(job.outputs_dir) for job in jobs], out)
        return EXIT_OK

    # Pairs that agree on everything but PRECISION share one conversion.
    groups: dict[tuple[Any, ...], list[PairJob]] = {}
    for job in jobs:
        groups.setdefault(_group_key(job), []).append(job)
    manifests: list[dict[str, Any]] = []
    for members in groups.values():
        first = members[0]
        union = parse_precisions([p.name for m in members for p in m.precisions])
        # The files are shared; each pair verifies and measures them on its own runtime (GPU pairs offload).
        targets = tuple(
            Target(
                m.outputs_dir, m.pair, m.log_file, tuple(p.name for p in m.precisions), _gpu_layers(args, m.pair, out)
            )
            for m in members
        )
        out.info(f"==> {first.model_name}: pairs {', '.join(m.pair.name for m in members)}")
        manifests += run_job(
            Job(
                model=str(first.model_dir),
                model_name=first.stem,
                precisions=union,
                targets=targets,
                options=_options(args, dict(first.settings), 0, first.config_dir),
                trained=first.trained,
            ),
            out,
        )
    _print_results(manifests, out)
    return EXIT_OK


def _forward_args(args: argparse.Namespace) -> list[str]:
    forwarded: list[str] = []
    for flag in ("force", "keep_base", "allow_pickle"):
        if getattr(args, flag):
            forwarded.append("--" + flag.replace("_", "-"))
    for flag in ("fidelity", "reference"):
        value = getattr(args, flag)
        if value is not None:
            forwarded.append(f"--{flag}" if value else f"--no-{flag}")
    for flag in ("threads", "n_gpu_layers"):
        value = getattr(args, flag)
        if value is not None:
            forwarded += ["--" + flag.replace("_", "-"), str(value)]
    # File options travel as they are: the docker backend mounts each file read-only into the container.
    for flag in ("imatrix", "calibration_text", "eval_text"):
        value = getattr(args, flag)
        if value is not None:
            forwarded += ["--" + flag.replace("_", "-"), str(value)]
    return forwarded


def _to_stderr(out: Output) -> Output:
    """An Output that prints everything, results included, for people on ``out``'s stderr (container logs)."""
    return Output("human", verbose=out.verbose, stdout=out.stderr, stderr=out.stderr)


def _manifest_of(folder: Path) -> dict[str, Any]:
    """The manifest a run left in ``folder``, with its path (as ``run_job`` returns it)."""
    return {**(read_manifest(folder) or {}), "manifest_path": str(folder / MANIFEST_NAME)}


def _print_results(manifests: Sequence[dict[str, Any]], out: Output) -> None:
    data = [{"pair": m.get("pair"), "manifest": m.get("manifest_path"), "files": _file_rows(m)} for m in manifests]
    out.result(_human_table(manifests), {"results": data})


# -- convert -------------------------------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace, out: Output) -> int:
    precisions = parse_precisions(args.precision, where="--precision")
    hub = not Path(args.model).exists() and looks_like_repo_id(args.model)
    if not hub and not Path(args.model).exists():
        raise UsageError(
            f"model not found: {args.model!r} is neither a local folder nor a Hub repo id (owner/name)",
        )
    if args.revision and not hub:
        raise UsageError("--revision applies to Hub repositories only", hint="drop --revision for a local folder")
    if hub:
        check_repo_id(args.model)
    pair = parse_pair(args.pair) if args.pair else None
    if args.model_name is not None:
        name = check_stem(args.model_name, "--model-name")
    else:
        derived = args.model.split("/")[-1] if hub else Path(args.model).resolve().name
        where = f"the output name taken from the {'repo id' if hub else 'folder name'} {show(args.model)}"
        try:
            name = check_stem(derived, where)
        except UsageError as exc:
            raise UsageError(exc.message, hint=f"pass --model-name NAME; {exc.hint}") from None
    outdir: Path = args.outdir.resolve()
    if not hub and outdir.is_relative_to(Path(args.model).resolve()):
        raise UsageError(
            f"--outdir {outdir} is inside the model folder {Path(args.model).resolve()}",
            hint="outputs never go into the input: choose an --outdir outside the model folder",
        )
    check_writable_dir(outdir, "--outdir")
    log_file = args.log_file.resolve() if args.log_file else None
    if args.backend == "docker":
        from .backends.docker import convert_spec, run_convert
        from .pairs import PAIRS

        forwarded = [a for p in precisions for a in ("--precision", p.name)]
        forwarded += ["--revision", args.revision] if args.revision else []
        spec = convert_spec(
            args.model, outdir, pair=pair or PAIRS["CPU_LLM_LLAMA"], model_name=name, image=args.image,
            convert_args=forwarded + _forward_args(args), verbose=out.verbose,
        )  # fmt: skip
        run_convert(spec, _to_stderr(out))
        manifests = [_manifest_of(outdir)]
        out.result(
            _human_table(manifests),
            {"manifest": manifests[0]["manifest_path"], "outdir": str(outdir), "files": _file_rows(manifests[0])},
        )
        return EXIT_OK
    manifests = run_job(
        Job(
            model=args.model,
            model_name=name,
            precisions=precisions,
            targets=(Target(outdir, pair, log_file),),
            options=_options(args, {}, _gpu_layers(args, pair, out), None, reference=True),
            hub=hub,
            revision=args.revision,
        ),
        out,
    )
    manifest = manifests[0]
    out.result(
        _human_table(manifests),
        {"manifest": manifest.get("manifest_path"), "outdir": str(outdir), "files": _file_rows(manifest)},
    )
    return EXIT_OK


# -- precisions, verify, toolchain ---------------------------------------------------------------------------------
def _cmd_precisions(args: argparse.Namespace, out: Output) -> int:
    rows = [
        {"name": p.name, "ftype": p.ftype, "bpw": p.bpw, "bpw_measured": p.bpw_measured,
         "needs_imatrix": p.needs_imatrix, "description": p.description}
        for p in PRECISIONS.values()
    ]  # fmt: skip
    lines = [f"{'NAME':<8} {'BPW':>6}  {'IMATRIX':<8} DESCRIPTION"]
    for r in rows:
        bpw = f"{r['bpw']:.2f}" + ("" if r["bpw_measured"] else "*")
        lines.append(f"{r['name']:<8} {bpw:>6}  {'required' if r['needs_imatrix'] else '-':<8} {r['description']}")
    lines.append("BPW: whole-file bits per weight measured on Llama-3.1-8B; * = the block format's nominal figure.")
    lines.append("Old spellings FP32/FP16 and llama.cpp's Q3_K/Q4_K/Q5_K are accepted; names are case-insensitive.")
    out.result("\n".join(lines), rows)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, out: Output) -> int:
    from .verify import file_type_label, load_check, read_back

    results: list[dict[str, Any]] = []
    labels: list[str] = []
    failed = 0
    for path in args.files:
        row: dict[str, Any] = {"file": str(path)}
        labels.append("")
        try:
            facts = read_back(path)
            row.update(dataclasses.asdict(facts))
            labels[-1] = file_type_label(facts)
            if not args.no_load:
                row["load"] = load_check(path, n_gpu_layers=args.n_gpu_layers or 0).as_dict()
            row["ok"] = True
        except ConverterError as exc:
            row.update(ok=False, error=exc.message)
            failed += 1
        results.append(row)
    lines = []
    for r, label in zip(results, labels, strict=True):
        if r["ok"]:
            load = f", generated {len(r['load']['generated_tokens'])} tokens" if "load" in r else ""
            lines.append(f"ok    {r['file']}: {r['architecture']} {label} {r['tensor_count']} tensors{load}")
        else:
            lines.append(f"FAIL  {r['file']}: {r['error']}")
    out.result("\n".join(lines), results)
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_toolchain(args: argparse.Namespace, out: Output) -> int:
    from . import toolchain

    if args.fetch or args.sdist:
        toolchain.ensure_converter(source=args.sdist)
    info = toolchain.toolchain_info()
    data = {
        "llama_cpp_python": info.llama_cpp_python,
        "sdist_sha256": info.sdist_sha256,
        "runtime_installed": info.runtime_installed,
        "converter_dir": str(info.converter_dir) if info.converter_dir else None,
        "cache": str(info.cache),
    }
    human = "\n".join(
        [
            f"pinned llama-cpp-python : {info.llama_cpp_python} (sdist sha256 {info.sdist_sha256[:16]}…)",
            f"installed runtime       : {info.runtime_installed or 'not installed'}",
            f"converter               : {info.converter_dir or 'not fetched yet (cecai-convert toolchain --fetch)'}",
            f"cache                   : {info.cache}",
        ]
    )
    out.result(human, data)
    if info.runtime_installed not in (None, info.llama_cpp_python):
        out.warning(f"installed llama-cpp-python {info.runtime_installed} differs from the pin")
        return EXIT_FAILED
    return EXIT_OK


# -- demo ----------------------------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace, out: Output) -> int:
    from .modelgen import make_seed_layout

    root: Path = args.workdir.resolve() / "TinyLlama"
    converter = root / "Converter"
    if not (converter / "models" / "tiny-llama" / "config.json").is_file():
        with out.step(f"building the embedded default model (random weights, {args.size}) in {converter}"):
            make_seed_layout(root, model_name="tiny-llama", size=args.size)
    args.converter_dir = converter
    args.pair = ["CPU_LLM_LLAMA"]
    return _cmd_run(args, out)


# -- registration --------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the core commands to the CLI."""
    p = sub.add_parser("run", help="convert a <NAME>/Converter folder for its pairs")
    p.add_argument("converter_dir", type=Path, metavar="CONVERTER_DIR")
    p.add_argument("--pair", action="append", help="pair to run (repeatable; default: every pair folder)")
    p.add_argument("--backend", choices=("local", "docker"), default=os.environ.get("CECAI_BACKEND", "local"))
    p.add_argument("--image", help="docker backend: the image to run (default: IMAGE_NAME, else the pair's tag)")
    p.add_argument("--models-path", type=Path, help="replace MODELS_PATH")
    p.add_argument("--outputs-path", type=Path, help="replace OUTPUTS_PATH")
    p.add_argument("--logs-path", type=Path, help="replace LOGS_PATH")
    _add_conversion_options(p)
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("convert", help="convert one model folder or Hub repo to some precisions")
    p.add_argument("model", metavar="MODEL", help="a local model folder or a Hub repo id (owner/name)")
    p.add_argument("--precision", action="append", required=True, help="a precision (repeatable), e.g. Q4_K_M")
    p.add_argument("--outdir", type=Path, required=True, help="folder for the GGUF files and manifest.json")
    p.add_argument("--revision", help="Hub revision: branch, tag or commit (resolved and recorded)")
    p.add_argument("--model-name", help="stem of the output files (default: the folder or repo name)")
    p.add_argument("--pair", help="the pair whose runtime verifies the files (recorded in the manifest)")
    p.add_argument("--log-file", type=Path, help="write the full log here too")
    p.add_argument(
        "--backend",
        choices=("local", "docker"),
        default="local",
        help="docker: convert inside the pair's image (--pair, default CPU_LLM_LLAMA), model folder read-only",
    )
    p.add_argument("--image", help="docker backend: the image to run (default: the pair's tag)")
    _add_conversion_options(p)
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("precisions", help="list the precisions: bits per weight, importance-matrix need")
    p.set_defaults(handler=_cmd_precisions)

    p = sub.add_parser("verify", help="read back and load GGUF files")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.add_argument("--no-load", action="store_true", help="only read the file structure; do not load the model")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("toolchain", help="show the pinned llama.cpp and where its converter lives")
    p.add_argument("--fetch", action="store_true", help="fetch and extract the converter now")
    p.add_argument("--sdist", type=Path, help="use this local copy of the pinned sdist instead of downloading")
    p.set_defaults(handler=_cmd_toolchain)

    p = sub.add_parser("demo", help="build the embedded default model and convert it (no network, no GPU)")
    p.add_argument("--workdir", type=Path, default=Path("cecai-demo"), help="where to build it (default ./cecai-demo)")
    p.add_argument("--size", choices=("tiny", "small", "1gb"), default="tiny")
    p.add_argument("--backend", choices=("local",), default="local")
    p.add_argument("--image", default=None)
    p.add_argument("--models-path", "--outputs-path", "--logs-path", dest="unused_paths", help=argparse.SUPPRESS)
    _add_conversion_options(p)
    p.set_defaults(handler=_cmd_demo, models_path=None, outputs_path=None, logs_path=None)
