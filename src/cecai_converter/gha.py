"""The GitHub Actions adapter: what the composite actions run (``python -m cecai_converter.gha COMMAND``).

It reads the action's inputs from ``INPUT_*`` environment variables (``action.yml`` maps every input into ``env:``;
no input is ever expanded inside a shell script), calls the same code as the CLI, and speaks the runner's protocol:

* a :class:`~cecai_converter.errors.ConverterError` (caught by the CLI's boundary, :func:`errors.boundary`)
  becomes one ``::error title=…::`` annotation (newlines as ``%0A``) plus a Markdown explanation in
  ``$GITHUB_STEP_SUMMARY``, and the exit code of the CLI;
* results go to ``$GITHUB_OUTPUT`` as ``key=value`` lines, multi-line values with a random heredoc delimiter;
* each conversion adds a table to the job summary (file, precision, size, sha256 prefix, time to make it),
  then the verification and fidelity time (``job_summary`` renders it);
* tokens (``HF_TOKEN``, ``GITHUB_TOKEN``) are masked with ``::add-mask::`` before anything else is printed.

Commands: ``convert``, ``plan``, ``publish``; run as ``cecai-convert gha COMMAND`` (or ``python -m
cecai_converter.gha COMMAND``).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import check, commands, environment
from .backends import BACKENDS, RELEASE_CHECK_BACKEND, default_backend
from .batch import load_batch
from .errors import EXIT_USAGE, CheckFailed, ChecksFailed, ConverterError, UsageError, boundary
from .job_summary import check_summary, conversion_summary, failure_summary
from .manifest import MANIFEST_NAME, read_manifest
from .markdown import code, inline
from .names import check_stem
from .option_table import OPTIONS
from .output import LOGGER_NAME, Output
from .plan import build_plan, matrix_json
from .records import CheckRecord, failure_message
from .release.hub_push import push_to_hub
from .release.publish import publish_release
from .release.split import SIZE_LIMIT
from .untrusted_json import loads_bounded

__all__ = [
    "annotation",
    "error_annotation",
    "escape_data",
    "escape_property",
    "main",
    "mask_secrets",
    "register",
    "split_list",
    "write_outputs",
]

#: Environment variables whose values are secrets and get masked first.
SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN", "INPUT_HF_TOKEN", "INPUT_GITHUB_TOKEN")


# --------------------------------------------------------------------------------------- the workflow commands


def escape_data(value: str) -> str:
    """Escape a workflow command's message (``%``, CR and LF), as the runner's toolkit does."""
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(value: str) -> str:
    """Escape a workflow command's property value (also ``:`` and ``,``)."""
    return escape_data(value).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, message: str, *, title: str | None = None) -> str:
    """``::error title=T::message`` (level: error, warning, notice)."""
    props = f" title={escape_property(title)}" if title else ""
    return f"::{level}{props}::{escape_data(message)}"


def error_annotation(exc: ConverterError) -> str:
    """The one-line annotation for a user-facing error: its title, message and hint."""
    message = exc.message + (f"\nhint: {exc.hint}" if exc.hint else "")
    return annotation("error", message, title=f"cecai-converter: {exc.title}")


class _OneLineFormatter(logging.Formatter):
    """Each log record on one line (CR/LF escaped): the runner reads workflow commands from stderr too, so a path or
    name holding ``\\n::warning::…`` must not start a line of its own."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_data(super().format(record))


def mask_secrets(env: Mapping[str, str], stream: TextIO) -> None:
    """``::add-mask::`` every secret value (each line of a multi-line one) so the log never shows it."""
    for name in SECRET_VARIABLES:
        value = env.get(name, "")
        # one command per line: a multi-line value is masked line by line (writing it whole would print line 2+)
        for line in dict.fromkeys(value.splitlines()):
            if line.strip():
                stream.write(f"::add-mask::{line}\n")
    stream.flush()


def write_outputs(path: str | os.PathLike[str] | None, values: Mapping[str, str]) -> None:
    """Append step outputs to ``$GITHUB_OUTPUT``; multi-line values use a random delimiter.

    Raises:
        UsageError: ``path`` is not set (not running in a workflow step) or a key is not a valid output name.
    """
    if not path:
        raise UsageError("GITHUB_OUTPUT is not set", hint="this command runs inside a GitHub Actions step")
    with Path(path).open("a", encoding="utf-8") as fh:
        for key, value in values.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
                raise UsageError(f"not a valid output name: {key!r}")
            if "\n" in value or "\r" in value:
                delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
                while delimiter in value:  # pragma: no cover (128 random bits)
                    delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
                fh.write(f"{key}<<{delimiter}\n{value}\n{delimiter}\n")
            else:
                fh.write(f"{key}={value}\n")


def append_summary(path: str | os.PathLike[str] | None, markdown: str) -> None:
    """Append Markdown to ``$GITHUB_STEP_SUMMARY`` (silently skipped outside a workflow)."""
    if path:
        with Path(path).open("a", encoding="utf-8") as fh:
            fh.write(markdown if markdown.endswith("\n") else markdown + "\n")


def split_list(value: str | None) -> list[str]:
    """An action's list input: items separated by newlines, commas or spaces; blanks dropped."""
    return [item for item in re.split(r"[\s,]+", value or "") if item]


def _truthy(value: str | None, default: bool = False) -> bool:
    if value is None or not value.strip():
        return default
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise UsageError(f"expected true or false, got {value!r}")


# ----------------------------------------------------------------------------------------------------- commands


class _ActionsOutput(Output):
    """JSON results into a buffer; warnings also as ``::warning::`` annotations, and kept for the job summary."""

    def __init__(self, buffer: TextIO, annotations: TextIO | None, *, verbose: bool) -> None:
        super().__init__("json", verbose=verbose, stdout=buffer)
        self.annotations = annotations
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        super().warning(message)
        self.warnings.append(message)
        if self.annotations is not None:
            self.annotations.write(annotation("warning", message, title="cecai-converter") + "\n")
            self.annotations.flush()


def _run_cli(
    argv: Sequence[str],
    *,
    annotations: TextIO | None = None,
    warnings: list[str] | None = None,
    allow_failure: bool = False,
) -> Any:
    """Run one CLI command in this process, in JSON mode, and return its result object.

    The command's errors propagate to :func:`main`, whose boundary is the CLI's (:func:`errors.boundary`).

    Args:
        argv: the command line after ``cecai-convert``.
        annotations: where warnings go as ``::warning::`` workflow commands (the step's stdout).
        warnings: collects the warnings' text (for the job summary).
        allow_failure: a command that printed its result and then failed (``check``) returns that result.
    """
    parser = _command_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse already printed why
        raise UsageError(
            f"the action's inputs make an invalid command line: cecai-convert {' '.join(argv)}",
            hint="check the inputs against the action's documentation (the log above says which one is wrong)",
        ) from (None if exc.code else exc)
    buffer = io.StringIO()
    out = _ActionsOutput(buffer, annotations, verbose=args.verbose)
    try:
        code = int(args.handler(args, out))
    except ConverterError:
        if not (allow_failure and buffer.getvalue().strip()):
            raise
        code = 0
    finally:
        if warnings is not None:
            warnings.extend(out.warnings)
    text = buffer.getvalue().strip()
    if code != 0:
        raise ConverterError(f"cecai-convert {argv[0]} exited with {code}")
    return json.loads(text) if text else {}


def _command_parser() -> argparse.ArgumentParser:
    """A parser for the CLI commands the actions drive (``convert``, ``check``), from their own modules.

    Not ``cli.build_parser``: ``cli`` registers this module as the ``gha`` command, and the adapter needs only
    these two commands (results are JSON through :class:`_ActionsOutput`, so no ``--format``).
    """

    parser = argparse.ArgumentParser(prog="cecai-convert")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands.register(sub)
    check.register(sub)
    return parser


def options_from_inputs(env: Mapping[str, str], environ: MutableMapping[str, str]) -> None:
    """Copy each conversion option's non-empty action input (``INPUT_KEEP_BASE``) to its ``CECAI_<NAME>``.

    An input left empty changes nothing, so a ``CECAI_<NAME>`` the caller's workflow or job sets stays in force.
    """
    for spec in OPTIONS:
        if env.get(spec.action_env, "").strip():
            environ[spec.env] = env[spec.action_env].strip()


def _convert(env: Mapping[str, str], stdout: TextIO) -> int:
    model = env.get("INPUT_MODEL", "").strip()
    if not model:
        raise UsageError("the `model` input is empty", hint="give a model folder or a Hugging Face repo id")
    precisions = split_list(env.get("INPUT_PRECISIONS"))
    if not precisions:
        raise UsageError("the `precisions` input is empty", hint="e.g. `precisions: Q8_0 Q4_K_M`")
    outdir = env.get("INPUT_OUTDIR", "").strip() or "gguf"
    if env.get("INPUT_MODEL_NAME", "").strip():
        check_stem(env["INPUT_MODEL_NAME"].strip(), "the `model-name` input")  # the CLI's rule, named for the action
    argv = ["convert", model, "--outdir", outdir]
    for precision in precisions:
        argv += ["--precision", precision]
    for key, flag in (("INPUT_PAIR", "--pair"), ("INPUT_REVISION", "--revision"), ("INPUT_MODEL_NAME", "--model-name")):
        if env.get(key, "").strip():
            argv += [flag, env[key].strip()]
    options_from_inputs(env, os.environ)
    backend = env.get("INPUT_BACKEND", "").strip() or default_backend(env)
    if env.get("INPUT_HF_TOKEN"):
        os.environ["HF_TOKEN"] = env["INPUT_HF_TOKEN"]  # masked in main(); read by huggingface_hub
    if backend not in BACKENDS:
        raise UsageError(f"the `backend` input must be {' or '.join(BACKENDS)}, got {backend!r}")
    if backend == "docker":
        # The docker backend decides the container (read-only model, non-root, GPUs per pair): container_spec.py
        argv += ["--backend", "docker"]
        if env.get("INPUT_IMAGE", "").strip():
            argv += ["--image", env["INPUT_IMAGE"].strip()]
    warnings: list[str] = []
    result = _run_cli(argv, annotations=stdout, warnings=warnings)
    # Every path output is written the way `outdir` was given (relative to the workspace when it was), so the
    # outputs can be joined and passed on alike.
    manifest_path = str(Path(outdir) / MANIFEST_NAME)
    manifest = read_manifest(Path(outdir))
    files = [str(Path(outdir) / f["name"]) for f in result.get("files") or []]
    write_outputs(
        env.get("GITHUB_OUTPUT"),
        {
            "files": "\n".join(files),
            "files-json": json.dumps(files),
            "manifest": manifest_path,
            "outdir": outdir,
        },
    )
    pair = env.get("INPUT_PAIR", "").strip()
    title = f"cecai-convert: {model}" + (f" ({pair})" if pair else "")
    summary = conversion_summary(result, manifest, title=title)
    if warnings:
        summary += "".join(f"> [!WARNING]\n> {inline(w)}\n\n" for w in warnings)
    append_summary(env.get("GITHUB_STEP_SUMMARY"), summary)
    stdout.write(f"converted {escape_data(model)}: {len(files)} file(s) in {escape_data(outdir)}\n")
    return 0


def _plan(env: Mapping[str, str], stdout: TextIO) -> int:

    batch_path = Path(env.get("INPUT_BATCH", "").strip() or "conversions.yaml")
    if_missing = env.get("INPUT_IF_MISSING", "").strip() or "fail"
    if if_missing not in ("fail", "skip"):
        raise UsageError(f"the `if-missing` input must be fail or skip, got {if_missing!r}")
    if not batch_path.is_file() and if_missing == "skip":
        stdout.write(annotation("notice", f"no batch file at {batch_path}: nothing to convert") + "\n")
        empty = json.dumps({"include": []})
        write_outputs(
            env.get("GITHUB_OUTPUT"),
            {"make": empty, "check": empty, "matrix": empty, "make-count": "0", "check-count": "0", "count": "0"},
        )
        return 0
    plan = build_plan(load_batch(batch_path), split_list(env.get("INPUT_PAIRS")) or None)
    make, check = plan["make"]["include"], plan["check"]["include"]
    write_outputs(
        env.get("GITHUB_OUTPUT"),
        {
            "make": matrix_json(plan["make"]),
            "check": matrix_json(plan["check"]),
            "matrix": matrix_json(plan["check"]),
            "make-count": str(len(make)),
            "check-count": str(len(check)),
            "count": str(len(check)),
        },
    )
    rows = [
        f"| make {inline(e['id'])} | {code(e['model'], cell=True)} | (builder) | {inline(e['precisions'])} | "
        f"{inline(', '.join(e['runner_labels']))} |"
        for e in make
    ] + [
        f"| check {inline(e['id'])} | {code(e['model'], cell=True)} | {inline(e['pair'])} ({inline(e['backend'])}) | "
        f"{inline(e['precisions'])} | {inline(', '.join(e['runner_labels']))} |"
        for e in check
    ]
    append_summary(
        env.get("GITHUB_STEP_SUMMARY"),
        "\n".join(
            [
                f"### Conversion plan: {len(make)} make job(s), {len(check)} check job(s)",
                "",
                "| Job | Model | Pair | Precisions | Runner labels |",
                "| --- | --- | --- | --- | --- |",
                *rows,
            ]
        )
        + "\n\n",
    )
    stdout.write(f"planned {len(make)} make and {len(check)} check job(s) from {escape_data(str(batch_path))}\n")
    return 0


def _check(env: Mapping[str, str], stdout: TextIO) -> int:
    folder = env.get("INPUT_PATH", "").strip()
    pair = env.get("INPUT_PAIR", "").strip()
    if not folder or not pair:
        raise UsageError("the `path` and `pair` inputs are required", hint="path: the make artifact's folder")
    argv = ["check", folder, "--pair", pair]
    backend = env.get("INPUT_BACKEND", "").strip() or RELEASE_CHECK_BACKEND
    if backend not in BACKENDS:
        raise UsageError(f"the `backend` input must be {' or '.join(BACKENDS)}, got {backend!r}")
    argv += ["--backend", backend]
    for key, flag in (
        ("INPUT_IMAGE", "--image"),
        ("INPUT_RECORD", "--record"),
        ("INPUT_MAX_KLD", "--max-kld"),
        ("INPUT_MIN_TOP1", "--min-top1"),
        ("INPUT_FIDELITY", "--fidelity"),
    ):
        if env.get(key, "").strip():
            argv += [flag, env[key].strip()]
    result = _run_cli(argv, annotations=stdout, allow_failure=True)
    # The command's JSON reply: where the record went, and the record itself.
    record_path = str(result.get("record", ""))
    record = CheckRecord.from_dict({k: v for k, v in result.items() if k != "record"})
    write_outputs(env.get("GITHUB_OUTPUT"), {"passed": str(bool(record.passed)).lower(), "record": record_path})
    append_summary(env.get("GITHUB_STEP_SUMMARY"), check_summary(record))
    if not record.passed:
        raise CheckFailed(failure_message(record), hint=f"the record is in {record_path}")
    stdout.write(f"{escape_data(pair)}: every file passed on this runtime\n")
    return 0


def _expand(value: str | None, name: str) -> list[Path]:
    """A list input's items as paths; globs such as ``artifacts/*`` are expanded here, never by a shell."""
    paths: list[Path] = []
    for item in split_list(value):
        if any(c in item for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(item))]  # noqa: PTH207 (Path.glob: relative only)
            if not matches:
                raise UsageError(f"the `{name}` input {item!r} matches nothing")
            paths += matches
        else:
            paths.append(Path(item))
    return paths


def _expected_checks(value: str) -> list[tuple[str, str]] | None:
    """The (model, pair) checks a release needs, from the plan's check matrix (``{"include": [...]}``)."""

    if not value.strip():
        return None
    matrix = loads_bounded(
        value, what="the `expected-checks` input", max_bytes=1024 * 1024, hint="pass needs.plan.outputs.check"
    )
    try:
        entries = matrix["include"]
        return [(str(e["name"]), str(e["pair"])) for e in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            "the `expected-checks` input is not the plan's check matrix",
            hint=f"pass needs.plan.outputs.check ({type(exc).__name__})",
        ) from None


def _publish(env: Mapping[str, str], stdout: TextIO) -> int:

    inputs = _expand(env.get("INPUT_PATH"), "path")
    # A check job that died before writing its record uploads nothing: the expected checks then name it.
    checks = [path for path in _expand(env.get("INPUT_CHECKS"), "checks") if path.exists()]
    expected = _expected_checks(env.get("INPUT_EXPECTED_CHECKS", ""))
    tag = env.get("INPUT_TAG", "").strip()
    if not tag and env.get("GITHUB_REF", "").startswith("refs/tags/"):
        tag = env["GITHUB_REF"].removeprefix("refs/tags/")
    hf_repo = env.get("INPUT_HF_REPO", "").strip()
    if not tag and not hf_repo:
        raise UsageError(
            "no release tag: set the `tag` input, or run on a tag push",
            hint="publish needs a release tag (or `hf-repo` to push to the Hugging Face Hub only)",
        )
    outputs: dict[str, str] = {}
    lines: list[str] = []
    if tag:
        repo = env.get("INPUT_REPOSITORY", "").strip() or env.get("GITHUB_REPOSITORY", "")
        size_limit = int(environment.text(environment.SPLIT_SIZE, env) or SIZE_LIMIT)  # smaller only in tests
        failed: ChecksFailed | None = None
        try:
            result = publish_release(
                inputs,
                repo=repo,
                tag=tag,
                token=env.get("GITHUB_TOKEN", ""),
                api_url=env.get("GITHUB_API_URL") or None,
                publish=not _truthy(env.get("INPUT_DRAFT")),
                size_limit=size_limit,
                target_commitish=env.get("GITHUB_SHA") or None,
                on_progress=lambda line: print(escape_data(line), file=stdout),
                checks=checks,
                expected_checks=expected,
            )
        except ChecksFailed as exc:  # everything was uploaded and the draft kept: say where, then fail the step
            failed, result = exc, exc.result
        outputs.update(
            {
                "release-url": result.html_url,
                "release-id": str(result.release_id),
                "uploaded": json.dumps(result.uploaded),
            }
        )
        state = "draft" if result.draft else "published"
        lines += [f"### Release {inline(tag)} ({state})", "", inline(result.html_url), ""]
        lines += ["| Asset | Status |", "| --- | --- |"]
        lines += [f"| {code(n, cell=True)} | uploaded |" for n in result.uploaded]
        lines += [f"| {code(n, cell=True)} | unchanged |" for n in result.unchanged]
        lines += [f"| {code(n, cell=True)} | replaced (check records changed) |" for n in result.replaced]
        if result.split:
            lines += ["", "Split below 2 GB (llama.cpp split format): " + ", ".join(code(n) for n in result.split)]
        if failed is not None:
            write_outputs(env.get("GITHUB_OUTPUT"), outputs)
            append_summary(env.get("GITHUB_STEP_SUMMARY"), "\n".join(lines) + "\n\n")
            raise failed
    if hf_repo:
        url = push_to_hub(
            inputs, hf_repo, token=env.get("HF_TOKEN") or None, revision=env.get("INPUT_HF_REVISION") or None
        )
        outputs["hub-commit-url"] = url
        lines += ["", f"Pushed to Hugging Face {code(hf_repo)}: {inline(url)}."]
    write_outputs(env.get("GITHUB_OUTPUT"), outputs)
    append_summary(env.get("GITHUB_STEP_SUMMARY"), "\n".join(lines) + "\n\n")
    return 0


_COMMANDS: dict[str, tuple[str, Callable[[Mapping[str, str], TextIO], int]]] = {
    "convert": ("conversion failed", _convert),
    "plan": ("planning failed", _plan),
    "check": ("check failed", _check),
    "publish": ("publishing failed", _publish),
}


def main(
    argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None, stdout: TextIO | None = None
) -> int:
    """Run one adapter command; returns the exit code (the CLI's codes: 0, 1, 2, 130)."""
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if env is None else env)
    out = stdout or sys.stdout
    mask_secrets(environ, out)
    if len(args) != 1 or args[0] not in _COMMANDS:
        out.write(annotation("error", f"usage: python -m cecai_converter.gha {{{','.join(_COMMANDS)}}}") + "\n")
        return EXIT_USAGE
    what, command = _COMMANDS[args[0]]
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLineFormatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

    def report(exc: ConverterError) -> None:
        out.write(error_annotation(exc) + "\n")
        out.flush()
        append_summary(environ.get("GITHUB_STEP_SUMMARY"), failure_summary(exc, what))

    def interrupted() -> None:
        out.write(annotation("error", "interrupted", title="cecai-converter: cancelled") + "\n")

    return boundary(lambda: command(environ, out), report=report, interrupted=interrupted)


def _run(args: argparse.Namespace, out: Output) -> int:
    return main([args.gha_command])


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``gha`` command (what the composite actions run; inputs come from INPUT_* variables)."""
    parser = subparsers.add_parser(
        "gha",
        help="GitHub Actions adapter used by the composite actions (reads INPUT_* variables)",
        description="Run one step of the composite actions: inputs from INPUT_* environment variables, results to "
        "$GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY, errors as ::error annotations.",
    )
    parser.add_argument("gha_command", choices=sorted(_COMMANDS), metavar="{" + ",".join(_COMMANDS) + "}")
    parser.set_defaults(handler=_run)


if __name__ == "__main__":
    sys.exit(main())
