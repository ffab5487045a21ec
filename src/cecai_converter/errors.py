"""The one error type users see, and its kinds.

Every failure a user can act on is a :class:`ConverterError`. It carries the exit code the CLI returns and an
optional hint (the next thing to try). It is rendered once, at :func:`boundary` (run by ``cli.main`` and by the
GitHub Actions adapter ``gha.main``); library code never calls ``sys.exit``. Anything that is not a
``ConverterError`` is a bug and keeps its traceback. Every kind lives in this module, so the kinds a command can
end with are in one place.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, Literal

from . import environment

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "AgreementFailed",
    "BadReference",
    "CheckFailed",
    "ChecksFailed",
    "ConfigError",
    "ContainerFailed",
    "ConversionFailed",
    "ConverterError",
    "EngineUnreachable",
    "GGUFHeaderError",
    "GitHubAPIError",
    "ImageNotFound",
    "ManifestError",
    "MeasurementFailed",
    "PublishFailed",
    "SignatureRefused",
    "SigningFailed",
    "SourceCheckFailed",
    "SourceMismatch",
    "SymlinkRefused",
    "ToolNotFound",
    "ToolchainError",
    "UnsupportedModel",
    "UsageError",
    "VerificationFailed",
    "WorkerFailed",
    "WorkerFailure",
    "boundary",
]

EXIT_OK = 0
#: a conversion, a tool or a check failed
EXIT_FAILED = 1
#: bad input or configuration: nothing was attempted
EXIT_USAGE = 2
#: Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130


class ConverterError(Exception):
    """A failure with a message meant for the user.

    Args:
        message: what failed, in one or two sentences.
        hint: the likely cause and the next command to run, if there is one.
    """

    exit_code: int = EXIT_FAILED
    title: str = "conversion failed"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


def boundary(
    work: Callable[[], int],
    *,
    report: Callable[[ConverterError], None],
    interrupted: Callable[[], None],
) -> int:
    """The one error boundary: run ``work`` and turn what the user can act on into an exit code.

    The CLI (``cli.main``) and the GitHub Actions adapter (``gha.main``) both run through here; they differ only in
    how they tell the user (``report``: a message on stderr, or an ``::error`` annotation and a job summary).
    Anything that is not a :class:`ConverterError` is a bug and propagates with its traceback. ``CECAI_DEBUG=1``
    prints the traceback of a ``ConverterError`` too.

    Args:
        work: the command; returns its exit code.
        report: shows a ``ConverterError`` (its exit code is returned afterwards).
        interrupted: called on Ctrl-C or SIGTERM (raised as ``KeyboardInterrupt``), before returning 130.
    """
    try:
        return int(work())
    except ConverterError as exc:
        if environment.is_set(environment.DEBUG):
            traceback.print_exc()
        report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        interrupted()
        return EXIT_INTERRUPTED


class UsageError(ConverterError):
    """The command line or the input folder is wrong; nothing was converted."""

    exit_code = EXIT_USAGE
    title = "bad input"


class ConfigError(UsageError):
    """A configuration file is missing, malformed, or holds an unknown key or value."""

    title = "bad configuration"


class UnsupportedModel(UsageError):
    """The model cannot be converted by the pinned llama.cpp (architecture, tokenizer, weight format)."""

    title = "unsupported model"


class SymlinkRefused(UsageError):
    """A symbolic link where this tool reads a model file or writes one of its own files: someone planted it, or
    a file was replaced by a link. Never followed (a write through it would land outside the folder); exit 2."""

    title = "symbolic link refused"


class ToolchainError(ConverterError):
    """The pinned llama.cpp toolchain is missing, incomplete or the wrong version."""

    title = "toolchain problem"


class ToolNotFound(ToolchainError):
    """A program or Python package the pipeline needs is not installed."""

    title = "tool not found"


class ConversionFailed(ConverterError):
    """A converter or quantizer step ran and failed.

    Args:
        message: what failed.
        return_code: the tool's exit status, when it was a process.
        output_tail: the last lines the tool printed, kept for the log and the error report.
        hint: what to try next.
    """

    def __init__(
        self,
        message: str,
        *,
        return_code: int | None = None,
        output_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.return_code = return_code
        self.output_tail = output_tail


class VerificationFailed(ConverterError):
    """An output file did not pass its read-back or load check; it was not published."""

    title = "verification failed"


class ManifestError(UsageError):
    """A ``manifest.json`` (or a published ``*.manifest.json``) is unreadable or has a malformed field."""

    title = "bad manifest"


class BadReference(ConfigError):
    """A ``reference.json`` is unreadable, too large, or has a field out of shape or range (named in the message).

    An input error (exit 2), never "this runtime could not evaluate the file": the file is not run against it.
    """

    title = "bad runtime reference"


class MeasurementFailed(ConverterError):
    """The fidelity measurement of a file could not be completed (the model failed to load or crashed)."""

    title = "fidelity measurement failed"


class SourceMismatch(ConverterError):
    """The base GGUF is not faithful to its source: its tokenizer, chat template, hyperparameters or logits differ
    from the source model's (the message names what differs); nothing was published."""

    title = "not faithful to the source"


class SourceCheckFailed(ConverterError):
    """The comparison with the source could not be run (transformers or llama.cpp crashed, ran out of time)."""

    title = "source check failed"


class AgreementFailed(ConverterError):
    """A runtime could not evaluate a file for the agreement check (it failed to load or crashed)."""

    title = "runtime check failed"


class CheckFailed(ConverterError):
    """A pair's runtime disagreed with the builder's, could not run a file, or saw other bytes."""

    title = "check failed"


class EngineUnreachable(ConverterError):
    """No container engine answers where ``DOCKER_HOST`` (or the default socket) points."""

    title = "container engine unreachable"


class ImageNotFound(ConverterError):
    """The pair's image is not present in the engine; the hint says how to build or pull it."""

    title = "image not found"


class ContainerFailed(ConversionFailed):
    """The conversion inside a container failed; ``exit_code`` is the container's own exit status."""

    title = "container failed"

    def __init__(self, message: str, *, return_code: int, hint: str | None = None) -> None:
        super().__init__(message, return_code=return_code, hint=hint)
        self.exit_code = return_code if 0 < return_code < 256 else EXIT_FAILED


class PublishFailed(ConverterError):
    """Publishing to GitHub or the Hugging Face Hub failed; the release was left as it was."""

    title = "publish failed"


class ChecksFailed(PublishFailed):
    """A pair's check failed or is missing: the files were uploaded, the release was left a draft.

    Attributes:
        result: what was done: the release's ``PublishResult`` (tag, release id and URL, draft, the assets uploaded,
            unchanged and replaced). Typed ``Any`` rather than by that class: this module is the ground floor and
            names nothing above it (a Protocol would not do either: gha assigns it to its ``PublishResult``).
    """

    title = "check failed"

    def __init__(self, message: str, *, hint: str | None = None, result: Any) -> None:
        super().__init__(message, hint=hint)
        self.result = result


class GitHubAPIError(PublishFailed):
    """GitHub answered a REST call with an error status.

    Attributes:
        status: the HTTP status (0 when the server could not be reached).
    """

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


#: How a worker process failed (:class:`WorkerFailed`).
WorkerFailure = Literal["usage", "failed", "crashed", "timeout"]


class WorkerFailed(ConversionFailed):
    """A worker process gave no result: it refused the job, failed, crashed or ran out of time.

    Callers turn it into their own kind (``VerificationFailed``, ``MeasurementFailed`` …) with the attributes.

    Attributes:
        worker: the worker's name, as messages show it.
        kind: ``usage`` (the job cannot be done as asked: exit code 2), ``failed`` (the job raised an error),
            ``crashed`` (no result: a signal, a non-zero exit, no or an unreadable result file) or ``timeout``.
        reason: why, in a few words (the job's error, the signal, the time limit).
        summary: the part of the output tail that says why (:func:`failure_summary`), without the worker's
            Python traceback.
        return_code / output_tail: the exit status and the last output lines (the full output is in the log).
    """

    title = "worker failed"

    def __init__(
        self,
        message: str,
        *,
        worker: str,
        kind: WorkerFailure,
        reason: str,
        summary: str,
        return_code: int | None,
        output_tail: str,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, return_code=return_code, output_tail=output_tail, hint=hint)
        self.worker = worker
        self.kind: WorkerFailure = kind
        self.reason = reason
        self.summary = summary
        if kind == "usage":
            self.exit_code = EXIT_USAGE


class SigningFailed(ConverterError):
    """The folder could not be signed; no signature was written."""

    title = "signing failed"


class SignatureRefused(VerificationFailed):
    """A signature does not match the folder, or was not made by the expected key or identity."""

    title = "signature refused"


class GGUFHeaderError(ValueError):
    """A file is not a well-formed GGUF file.

    A ``ValueError``, not a :class:`ConverterError`: the header reader is a parser, and its callers (verify,
    fidelity, agreement) turn this into the user-facing kind with the file's name.
    """
