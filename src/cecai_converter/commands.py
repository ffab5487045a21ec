"""The core commands: ``run``, ``convert``, ``precisions``, ``verify``, ``toolchain`` and ``demo``.

Handlers translate arguments into pipeline calls and print results; they decide nothing else: the options come
resolved from :mod:`cecai_converter.request`, the pair grouping from :func:`cecai_converter.config.group_jobs`, the
default backend from :mod:`cecai_converter.backends`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import toolchain
from .backends import BACKEND_ENV, BACKENDS, default_backend
from .backends.container_spec import convert_spec
from .backends.docker import run_convert, run_jobs
from .config import check_writable_dir, group_jobs, load_converter_dir, load_yaml_mapping
from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConverterError, UsageError
from .fsutil import atomic_write_text, refuse_symlink, write_target
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .modelgen import make_seed_layout
from .multimodal import image_check_many
from .names import check_stem, show
from .option_flags import add_arguments
from .option_table import OPTIONS, Command
from .output import Output, decimal_size
from .pairs import DEFAULT_PAIR, PAIRS, parse_pair
from .pipeline import Job, Target, run_job
from .precisions import PRECISIONS, parse_precisions
from .quant_types import quantization_record
from .request import Request, check_texts, load_request, resolve
from .runtime import gpu_layer_count, gpu_layers
from .source import check_repo_id, looks_like_repo_id
from .source_parity import summary as parity_summary
from .verify import file_type_label, load_check, read_back

__all__ = ["register"]


# -- shared ---------------------------------------------------------------------------------------------------------
_BACKEND_HELP = (
    f"where the conversion runs (default: ${BACKEND_ENV}, else local; the per-pair scripts and nox sessions: docker)"
)


def _backend(args: argparse.Namespace) -> str:
    """``--backend``, else the one default (:func:`cecai_converter.backends.default_backend`)."""
    backend: str = args.backend or default_backend()
    if backend not in BACKENDS:
        raise UsageError(
            f"{BACKEND_ENV}={backend!r} is not a backend",
            hint=f"choose one of {', '.join(BACKENDS)} (or unset {BACKEND_ENV}: the default is local)",
        )
    return backend


def _request_for(
    args: argparse.Namespace,
    settings: Mapping[str, Any],
    config_dir: Path | None,
    where: str | Mapping[str, str],
    command: Command,
) -> Request:
    """The options of one conversion: the container's request when given, else resolved from flag/YAML/env."""
    if args.request is not None:
        given = [spec.flag for spec in OPTIONS if getattr(args, spec.name, None) is not None]
        if given:
            raise UsageError(
                f"--request carries every option; {', '.join(given)} would be ignored",
                hint="drop them, or drop --request and give the options as flags",
            )
        return load_request(args.request)
    request = resolve(args, settings, os.environ, command=command, config_dir=config_dir, yaml_where=where)
    check_texts(request, where)  # before any work: a bad text found after the conversion cost all of it
    return request


def _file_rows(manifest: Manifest) -> list[dict[str, Any]]:
    folder = manifest.folder
    rows = []
    for entry in [*manifest.files, *(manifest.mmproj or [])]:  # a vision model's projector files too (role mmproj)
        row = entry.to_dict()
        if folder is not None:
            row["path"] = str(folder / entry.name)
        rows.append(row)
    return rows


def _human_table(manifests: Sequence[Manifest]) -> str:
    lines = []
    for manifest in manifests:
        head = manifest.pair or "output"
        lines.append(f"{head}: {manifest.path or ''}")
        for entry in [*manifest.files, *(manifest.mmproj or [])]:  # a vision model's projector files too
            fid = entry.fidelity_record
            kld = f"  kld={fid.kld_mean:.5f}" if fid is not None and fid.kld_mean is not None else ""
            lines.append(
                f"  {entry.name:<40} {entry.precision:<7} {decimal_size(entry.bytes):>9}  "
                f"sha256 {entry.sha256[:12]}  verified {'yes' if entry.verification else 'no'}{kld}"
            )
        # The base against its source model: what "faithful" rests on, so it is shown with the files.
        lines.append(f"  source check: {parity_summary(manifest.source_parity)}")
        towers = manifest.multimodal_record
        if towers is not None and towers.text_only:
            lines.append(f"  text only: left out {', '.join(towers.left_out)} (--text-only)")
    return "\n".join(lines)


# -- run -----------------------------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace, out: Output) -> int:
    backend = _backend(args)
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
    requests = [_request_for(args, job.settings, job.config_dir, job.key_files, "run") for job in jobs]
    if backend == "docker":
        # Containers print for people (to stderr); the result, one document for all pairs, comes from the
        # manifests they left on this machine, with this machine's paths.
        run_jobs(jobs, requests, image=args.image, out=_to_stderr(out))
        _print_results([_manifest_of(job.outputs_dir) for job in jobs], out)
        return EXIT_OK

    manifests: list[Manifest] = []
    for members in group_jobs(list(zip(jobs, requests, strict=True))):
        (first, request), *_ = members
        union = parse_precisions([p.name for m, _ in members for p in m.precisions])
        # The files are shared; each pair verifies and measures them on its own runtime (GPU pairs offload), and
        # records its own request.
        targets = tuple(
            Target(
                m.outputs_dir, m.pair, m.log_file, tuple(p.name for p in m.precisions),
                gpu_layers(r, m.pair, out.warning), request=r.record(),
            )
            for m, r in members
        )  # fmt: skip
        out.info(f"==> {first.model_name}: pairs {', '.join(m.pair.name for m, _ in members)}")
        manifests += run_job(
            Job(
                model=str(first.model_dir),
                model_name=first.stem,
                precisions=union,
                targets=targets,
                options=request.to_options(),
                trained=first.trained,
            ),
            out,
        )
    _print_results(manifests, out)
    return EXIT_OK


def _to_stderr(out: Output) -> Output:
    """An Output that prints everything, results included, for people on ``out``'s stderr (container logs)."""
    return Output("human", verbose=out.verbose, stdout=out.stderr, stderr=out.stderr)


def _manifest_of(folder: Path) -> Manifest:
    """The manifest a run left in ``folder`` (as ``run_job`` returns it); an empty one when it left none."""
    return read_manifest(folder) or Manifest(path=folder / MANIFEST_NAME)


def _print_results(manifests: Sequence[Manifest], out: Output) -> None:
    data = [{"pair": m.pair, "manifest": str(m.path) if m.path else None, "files": _file_rows(m)} for m in manifests]
    out.result(_human_table(manifests), {"results": data})


# -- convert -------------------------------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace, out: Output) -> int:

    backend = _backend(args)
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
    # The folder resolved, the name not: a link at the log's name is refused (pipeline), never followed.
    log_file = write_target(args.log_file) if args.log_file else None
    request = _request_for(args, {}, None, "convert", "convert")
    if backend == "docker":
        spec = convert_spec(
            args.model, outdir, request, pair=pair or PAIRS[DEFAULT_PAIR], model_name=name, image=args.image,
            precisions=[p.name for p in precisions], revision=args.revision, verbose=out.verbose,
        )  # fmt: skip
        run_convert(spec, _to_stderr(out))
        manifests = [_manifest_of(outdir)]
        out.result(
            _human_table(manifests),
            {"manifest": str(manifests[0].path), "outdir": str(outdir), "files": _file_rows(manifests[0])},
        )
        return EXIT_OK
    manifests = run_job(
        Job(
            model=args.model,
            model_name=name,
            precisions=precisions,
            targets=(Target(outdir, pair, log_file, request=request.record()),),
            options=request.to_options(gpu_layers(request, pair, out.warning)),
            hub=hub,
            revision=args.revision,
        ),
        out,
    )
    manifest = manifests[0]
    out.result(
        _human_table(manifests),
        {"manifest": str(manifest.path), "outdir": str(outdir), "files": _file_rows(manifest)},
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

    for path in args.files:  # the rule every reader of a GGUF keeps: before any file is read
        refuse_symlink(Path(path))
    results: list[dict[str, Any]] = []
    labels: list[str] = []
    failed = not_gguf = 0
    for path in args.files:
        row: dict[str, Any] = {"file": str(path)}
        labels.append("")
        why = _not_a_gguf(Path(path))
        if why is not None:  # bad input (exit 2), reported in its row like any failure; the others are still read
            row.update(ok=False, error=f"{Path(path).name}: {why}", input_error=True)
            not_gguf += 1
            results.append(row)
            continue
        try:
            facts = read_back(path)
            row.update({f.name: getattr(facts, f.name) for f in dataclasses.fields(facts) if f.name != "tensors"})
            # What the file holds, by type (not every tensor): as a manifest's quantization record has it.
            record = quantization_record(facts.tensors, fallbacks=(), overrides=())
            row["tensor_types"], row["tensor_bpw"] = record["types"], record["bpw"]
            labels[-1] = file_type_label(facts)
            if facts.architecture == "clip":  # a projector (mmproj): shown the test image with a text file below
                row["projector"] = True
            elif not args.no_load:
                row["load"] = load_check(path, n_gpu_layers=args.n_gpu_layers or 0).as_dict()
            row["ok"] = True
        except ConverterError as exc:
            row.update(ok=False, error=exc.message)
            failed += 1
        results.append(row)
    failed += _verify_projectors(results, args)
    lines = []
    for r, label in zip(results, labels, strict=True):
        if r["ok"]:
            load = f", generated {len(r['load']['generated_tokens'])} tokens" if "load" in r else ""
            if "image" in r:
                load = f", shown the test image with {Path(r['image']['model']).name}"
                load += f" ({r['image']['image_tokens']} image tokens, {len(r['image']['generated_tokens'])} generated)"
            lines.append(f"ok    {r['file']}: {r['architecture']} {label} {r['tensor_count']} tensors{load}")
        else:
            lines.append(f"FAIL  {r['file']}: {r['error']}")
    out.result("\n".join(lines), results)
    if not_gguf:
        out.error(
            f"{not_gguf} of the {len(args.files)} path(s) given to verify name(s) no GGUF file",
            hint="give the paths of .gguf files (a file that is missing, a folder or not a GGUF cannot be verified)",
        )
        return EXIT_USAGE
    return EXIT_FAILED if failed else EXIT_OK


def _not_a_gguf(path: Path) -> str | None:
    """Why ``path`` names no GGUF file at all (bad input, exit 2: missing, not a regular file, unreadable, not
    starting with the GGUF magic), or None: then it is a GGUF, and what is wrong inside it is a failed verification
    (exit 1). Only a regular file is opened: a FIFO would block the read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        return "not a regular file (a folder, FIFO, socket or device)"
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if magic == b"GGUF" else "not a GGUF file (it does not start with the GGUF magic)"


def _verify_projectors(results: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Show the test image through each projector among the files, with the first text file that loaded; return how
    many failed. A projector given without a text file is only read back (it cannot run alone)."""

    texts = [Path(r["file"]) for r in results if r["ok"] and "load" in r]
    failed = 0
    for row in results:
        if not row.get("projector") or not row["ok"] or args.no_load or not texts:
            continue
        try:
            check = image_check_many([(texts[0], Path(row["file"]))], n_gpu_layers=args.n_gpu_layers or 0)
            row["image"] = {**next(iter(check.values())).as_dict(), "model": str(texts[0])}
        except ConverterError as exc:
            row.update(ok=False, error=exc.message)
            failed += 1
    return failed


def _cmd_toolchain(args: argparse.Namespace, out: Output) -> int:

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
#: What the demo adds to its configuration: the runtime reference `check` compares other runtimes against.
DEMO_REFERENCE_LINE = "REFERENCE: true  # reference.json: `cecai-convert check` compares a runtime against it\n"


def _demo_asks_for_the_reference(converter: Path) -> None:
    """Make the demo's ``converter_args.yaml`` ask for ``reference.json`` (``run`` does not write it by default),
    so that ``check`` works on the demo's output. A folder made by an older demo gets the line too; a REFERENCE
    the user set is left as it is."""

    general = converter / "configurations" / "converter_args.yaml"
    if "REFERENCE" in load_yaml_mapping(general):
        return
    text = general.read_text(encoding="utf-8")
    atomic_write_text(general, text + ("" if text.endswith("\n") or not text else "\n") + DEMO_REFERENCE_LINE)


def _cmd_demo(args: argparse.Namespace, out: Output) -> int:

    root: Path = args.workdir.resolve() / "TinyLlama"
    converter = root / "Converter"
    if not (converter / "models" / "tiny-llama" / "config.json").is_file():
        with out.step(f"building the embedded default model (random weights, {args.size}) in {converter}"):
            make_seed_layout(root, model_name="tiny-llama", size=args.size)
    _demo_asks_for_the_reference(converter)
    args.converter_dir = converter
    args.pair = [DEFAULT_PAIR]
    code = _cmd_run(args, out)
    if code == EXIT_OK:
        outputs = converter / "outputs" / DEFAULT_PAIR
        out.info(
            "next: check these files on a pair's runtime, here or in its image:\n"
            f"  cecai-convert check {outputs} --pair {DEFAULT_PAIR}\n"
            f"  cecai-convert check {outputs} --pair {DEFAULT_PAIR} --backend docker"
        )
    return code


# -- registration --------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the core commands to the CLI."""
    p = sub.add_parser("run", help="convert a <NAME>/Converter folder for its pairs")
    p.add_argument("converter_dir", type=Path, metavar="CONVERTER_DIR")
    p.add_argument("--pair", action="append", help="pair to run (repeatable; default: every pair folder)")
    p.add_argument("--backend", choices=BACKENDS, help=_BACKEND_HELP)
    p.add_argument("--image", help="docker backend: the image to run (default: IMAGE_NAME, else the pair's tag)")
    p.add_argument("--models-path", type=Path, help="replace MODELS_PATH")
    p.add_argument("--outputs-path", type=Path, help="replace OUTPUTS_PATH")
    p.add_argument("--logs-path", type=Path, help="replace LOGS_PATH")
    add_arguments(p, "run")
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
        choices=BACKENDS,
        help=_BACKEND_HELP
        + f"; docker converts in the --pair's image (default {DEFAULT_PAIR}), model folder read-only",
    )
    p.add_argument("--image", help="docker backend: the image to run (default: the pair's tag)")
    add_arguments(p, "convert")
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("precisions", help="list the precisions: bits per weight, importance-matrix need")
    p.set_defaults(handler=_cmd_precisions)

    p = sub.add_parser("verify", help="read back and load GGUF files")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.add_argument("--no-load", action="store_true", help="only read the file structure; do not load the model")
    p.add_argument("--n-gpu-layers", type=gpu_layer_count, default=0, metavar="N", help="layers to offload, -1 for all")
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
    add_arguments(p, "run")
    p.set_defaults(handler=_cmd_demo, models_path=None, outputs_path=None, logs_path=None)
