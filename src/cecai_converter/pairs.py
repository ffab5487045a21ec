"""The four hardware pairs: what each one is, where it runs and which image serves it.

A *pair* is a target runtime (llama-cpp-python built for some hardware). The GGUF bytes do not depend on the pair;
what differs is where the file is verified, which image converts it and which runners a CI job needs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from .errors import UsageError

__all__ = ["PAIRS", "PairInfo", "parse_pair"]


@dataclass(frozen=True)
class PairInfo:
    """One hardware pair.

    Attributes:
        name: the folder and key name users write (``GPU_LLM_LLAMA``).
        slug: the short name used by images, nox sessions and scripts (``gpu``).
        platform: the container platform its image is built for.
        accelerator: ``cpu``, ``cuda`` (x86-64 with an NVIDIA GPU) or ``jetson`` (L4T, the nvidia runtime).
        runner_labels: the default GitHub runner labels that route a job to this hardware.
    """

    name: str
    slug: str
    platform: str
    accelerator: str
    runner_labels: tuple[str, ...]

    @property
    def config_filename(self) -> str:
        """The pair's configuration file, ``converter_args_<pair in lower case>.yaml``."""
        return f"converter_args_{self.name.lower()}.yaml"


PAIRS: Final[MappingProxyType[str, PairInfo]] = MappingProxyType(
    {
        p.name: p
        for p in (
            PairInfo("CPU_LLM_LLAMA", "cpu", "linux/amd64", "cpu", ("self-hosted", "linux", "X64")),
            PairInfo("GPU_LLM_LLAMA", "gpu", "linux/amd64", "cuda", ("self-hosted", "linux", "X64", "gpu")),
            PairInfo("ARM_LLM_LLAMA", "arm", "linux/arm64", "cpu", ("self-hosted", "linux", "ARM64")),
            PairInfo(
                "AGX_ORIN_LLM_LLAMA", "agx-orin", "linux/arm64", "jetson", ("self-hosted", "linux", "ARM64", "agx-orin")
            ),
        )
    }
)


def parse_pair(value: str) -> PairInfo:
    """Resolve a pair by its name (``CPU_LLM_LLAMA``) or slug (``cpu``), case-insensitively.

    Raises:
        UsageError: not a known pair; the message names the closest one.
    """
    key = value.strip()
    for info in PAIRS.values():
        if key.upper() == info.name or key.lower() == info.slug:
            return info
    names = [*PAIRS, *(p.slug for p in PAIRS.values())]
    close = difflib.get_close_matches(key.upper(), list(PAIRS), n=1, cutoff=0.6)
    suggestion = f" Did you mean {close[0]}?" if close else ""
    raise UsageError(f"unknown pair {value!r}.{suggestion}", hint=f"known pairs: {', '.join(names)}")
