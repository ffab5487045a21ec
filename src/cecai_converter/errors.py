"""The one error type users see, and its kinds.

Every failure a user can act on is a :class:`ConverterError`. It carries the exit code the CLI returns and an
optional hint (the next thing to try). The CLI renders it once (see ``cli.main``); library code never calls
``sys.exit``. Anything that is not a ``ConverterError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ConfigError",
    "ConversionFailed",
    "ConverterError",
    "ToolNotFound",
    "ToolchainError",
    "UnsupportedModel",
    "UsageError",
    "VerificationFailed",
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
