"""How a runner builds its own llama-cpp-python: the pair's CMake flags, and the key its wheel is cached under.

A CI job that installs the local backend must not compile llama.cpp on every run (six minutes on two cores). The
composite actions cache the wheel under :func:`wheel_key`: the pin, the CPU architecture and the flags, so a
wheel is reused exactly where it was built for. This module runs before the package is installed
(``actions/install.sh`` puts ``src/`` on ``PYTHONPATH``), so it uses the standard library only::

    python -m cecai_converter.runtime_build cmake-args [PAIR]   the flags, one line
    python -m cecai_converter.runtime_build wheel-key [PAIR]    <pin>-<machine>-<hash of flags>
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from typing import Final

from .pairs import PAIRS, PairInfo, parse_pair
from .toolchain import LLAMA_CPP_PYTHON_VERSION

__all__ = ["cmake_args", "main", "wheel_key"]

_USAGE: Final = "usage: python -m cecai_converter.runtime_build {cmake-args|wheel-key} [PAIR]"


def _default_pair() -> PairInfo:
    """Without a pair: the CPU pair of this machine's architecture."""
    return PAIRS["ARM_LLM_LLAMA"] if platform.machine().lower() in ("aarch64", "arm64") else PAIRS["CPU_LLM_LLAMA"]


def cmake_args(pair: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The CMake flags llama-cpp-python is built with for ``pair``: ``CMAKE_ARGS`` when set, else the pair's."""
    env = os.environ if environ is None else environ
    if env.get("CMAKE_ARGS"):
        return env["CMAKE_ARGS"]
    info = parse_pair(pair) if pair else _default_pair()
    return " ".join(info.cmake_args)


def wheel_key(pair: str | None = None, environ: dict[str, str] | None = None) -> str:
    """``<pin>-<machine>-<12 hex of the flags>``: one cached wheel per pin, CPU architecture and build flags."""
    flags = hashlib.sha256(cmake_args(pair, environ).encode()).hexdigest()[:12]
    return f"{LLAMA_CPP_PYTHON_VERSION}-{platform.machine().lower()}-{flags}"


def main(argv: list[str] | None = None) -> int:
    """The command line above; exit 2 on bad usage or an unknown pair."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("cmake-args", "wheel-key") or len(args) > 2:
        print(_USAGE, file=sys.stderr)
        return 2
    pair = args[1] if len(args) == 2 and args[1] else None
    try:
        print(cmake_args(pair) if args[0] == "cmake-args" else wheel_key(pair))
    except Exception as exc:  # an unknown pair: UsageError, printed plainly for the shell
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
