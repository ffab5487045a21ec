"""Helpers for ./dev that say what an install is about to do: which torch build, and how a long build is going.

    python scripts/lib/dev_install.py torch [--dry-run] [--python PY] [--pin VERSION]
    python scripts/lib/dev_install.py install [--python PY] -- PIP_INSTALL_ARG ...
    python scripts/lib/dev_install.py heartbeat --log FILE [--every 30] [--what TEXT] -- COMMAND [ARG ...]

``torch``: the converter needs only torch's CPU build, but on x86-64 and aarch64 Linux PyPI's ``torch`` is the
multi-GB CUDA build plus its ``nvidia-*`` packages. So, unless the environment already has the pinned version, this
installs ``torch==<pin>`` from the PyTorch CPU index when that index answers and lists the pin
(``CECAI_TORCH_INDEX_URL`` replaces the index, e.g. for a mirror); when it does not, it prints what pip is about to
download for torch, and from where, and leaves the install to pip. ``--dry-run`` prints the decision as one JSON
line instead of installing.

``install``: ``pip install --quiet`` with the given arguments, then one line naming what pip installed (from its
``--report``), instead of a line per requirement already satisfied.

``heartbeat``: runs a command with its output in a log file and prints, every ``--every`` seconds, the elapsed time
and the command's latest progress line (ninja's ``[12/150]``, make's ``[ 45%]``); on failure, the log's tail.

Standard library only: it runs before anything is installed. Python >= 3.10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
#: Where the PyTorch CPU index has wheels. Elsewhere PyPI's torch has no CUDA libraries to avoid.
CPU_INDEX_PLATFORMS = frozenset({("linux", "x86_64"), ("linux", "aarch64")})
PROBE_TIMEOUT_S = 5.0
_PROGRESS = re.compile(r"^\s*(\[\s*\d+/\d+\]|\[\s*\d+%\])")


@dataclass(frozen=True)
class TorchPlan:
    """What to do about torch: ``present``, ``cpu-index`` (run ``command``) or ``package-index`` (pip decides)."""

    action: str
    pin: str
    reason: str
    command: list[str] | None = None


def torch_pin(pyproject: Path) -> str:
    """The version in pyproject's ``"torch==X"`` requirement (the ``local`` extra)."""
    match = re.search(r'"torch==([^"]+)"', pyproject.read_text(encoding="utf-8"))
    if match is None:
        raise SystemExit(f"error: {pyproject} pins no torch==VERSION")
    return match.group(1)


def installed_torch(python: str) -> str | None:
    """The torch version installed for interpreter ``python``, or None."""
    code = "import importlib.metadata as m\ntry: print(m.version('torch'))\nexcept m.PackageNotFoundError: pass"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None


def probe(index_url: str, pin: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``index_url`` cannot give ``torch==pin`` (None: its ``torch/`` page answers and lists the pin)."""
    url = index_url.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (./dev's index URL)
            page = response.read(50_000_000).decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url} is not reachable ({getattr(exc, 'reason', exc)})"
    if not re.search(rf"torch-{re.escape(pin)}(?:%2B|\+|-)", page):
        return f"{url} lists no torch {pin}"
    return None


def choose(pin: str, installed: str | None, system: str, machine: str, unreachable: str | None) -> TorchPlan:
    """The torch plan for an environment with ``installed`` torch on ``system``/``machine``.

    ``unreachable`` is :func:`probe`'s answer for the CPU index (only consulted where that index has wheels).
    """
    if installed is not None and installed.split("+", 1)[0] == pin:
        return TorchPlan("present", pin, f"torch {installed} is already installed")
    if (system, machine) not in CPU_INDEX_PLATFORMS:
        return TorchPlan("package-index", pin, f"PyPI's torch for {system}/{machine} is used as it is")
    if unreachable is None:
        return TorchPlan("cpu-index", pin, "the PyTorch CPU index answers")
    return TorchPlan("package-index", pin, unreachable)


def _pip(python: str) -> list[str]:
    """pip, run by this interpreter, acting on ``python``'s environment."""
    same = Path(python).absolute() == Path(sys.executable).absolute()
    return [sys.executable, "-m", "pip", *([] if same else ["--python", python])]


def _size(url: str) -> int | None:
    """The size of a download, from the file or a HEAD request (None when unknown)."""
    if url.startswith("file://"):
        path = Path(urllib.request.url2pathname(url[len("file://") :]))
        return path.stat().st_size if path.exists() else None
    try:
        request = urllib.request.Request(url, method="HEAD")  # noqa: S310 (a URL pip chose)
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:  # noqa: S310
            length = response.headers.get("Content-Length")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return int(length) if length and length.isdigit() else None


def _gb(n: int) -> str:
    if n >= 100_000_000:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def describe_downloads(report: dict[str, Any]) -> list[str]:
    """Lines saying what a ``pip install --dry-run --report`` would fetch, and a warning for a CUDA torch."""
    items = report.get("install")
    if not isinstance(items, list) or not items:
        return ["    pip has nothing to install for torch"]
    lines: list[str] = []
    nvidia: list[str] = []
    remote_total = local = unknown = 0
    torch_remote = False
    for item in items:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        url = item.get("download_info", {}).get("url", "")
        if url.startswith("file://"):
            local += 1
            where = f"local file {urllib.request.url2pathname(url[len('file://') :])}"
        else:
            size = _size(url)
            remote_total += size or 0
            unknown += size is None
            where = f"{url.split('/')[2] if '//' in url else url}, {_gb(size) if size is not None else 'size unknown'}"
            torch_remote |= name.lower() == "torch"
        nvidia += [name] if name.lower().startswith("nvidia-") else []
        lines.append(f"    {name} {version}  ({where})")
    remote = len(items) - local
    total = f"{_gb(remote_total)}" + (f" + {unknown} of unknown size" if unknown else "")
    lines.append(f"    {len(items)} packages: {local} from local files, {remote} to download ({total})")
    if torch_remote and nvidia:
        lines += [
            f"WARNING: this is PyPI's CUDA build of torch, with {len(nvidia)} nvidia-* packages; the converter",
            "         needs only the CPU build. To skip this download, stop now (Ctrl-C) and either put a CPU wheel of",
            "         torch in a folder and run again with PIP_FIND_LINKS=that-folder, or make",
            f"         {CPU_INDEX_URL} (or CECAI_TORCH_INDEX_URL) reachable.",
        ]
    return lines


def _announce_downloads(plan: TorchPlan, python: str) -> None:
    """Print what pip would download for torch (its own resolution, nothing installed)."""
    cmd = [*_pip(python), "install", "--dry-run", "--quiet", "--report", "-", f"torch=={plan.pin}"]
    print(f"==> torch: {plan.reason}; pip will take torch=={plan.pin} from your package index:")
    sys.stdout.flush()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        print(
            "    (pip could not say: it needs pip >= 22.3)\n"
            "WARNING: on x86-64 and aarch64 Linux, PyPI's torch is the multi-GB CUDA build plus about 15 nvidia-*\n"
            f"         packages. To avoid it, install torch=={plan.pin} from a CPU wheel first"
            " (PIP_FIND_LINKS=folder)."
        )
        return
    print("\n".join(describe_downloads(report)))


def torch_main(ns: argparse.Namespace) -> int:
    pin = ns.pin or torch_pin(ROOT / "pyproject.toml")
    index_url = os.environ.get("CECAI_TORCH_INDEX_URL") or CPU_INDEX_URL
    installed = installed_torch(ns.python)
    system, machine = sys.platform, platform.machine().lower()
    if machine == "arm64":
        machine = "aarch64"
    needs_probe = not (installed and installed.split("+", 1)[0] == pin) and (system, machine) in CPU_INDEX_PLATFORMS
    plan = choose(pin, installed, system, machine, probe(index_url, pin) if needs_probe else None)
    if plan.action == "cpu-index":
        plan = TorchPlan(
            plan.action, pin, plan.reason, [*_pip(ns.python), "install", f"torch=={pin}", "--index-url", index_url]
        )
    if ns.dry_run:
        print(json.dumps(asdict(plan)))
        return 0
    if plan.action == "present":
        print(f"==> torch: {plan.reason}")
    elif plan.action == "cpu-index" and plan.command is not None:
        print(f"==> installing torch {pin}, CPU build, from {index_url} (the converter needs no CUDA)")
        sys.stdout.flush()
        if subprocess.run(plan.command, check=False).returncode != 0:
            _announce_downloads(TorchPlan("package-index", pin, f"installing from {index_url} failed"), ns.python)
    else:
        _announce_downloads(plan, ns.python)
    return 0


def describe_install(report: dict[str, Any]) -> str:
    """One line for what a ``pip install --report`` installed: the packages by name and version, or nothing new."""
    items = report.get("install")
    if not isinstance(items, list) or not items:
        return "    pip installed nothing: every requirement was already satisfied"
    names = []
    for item in items:
        metadata = item.get("metadata") or {}
        editable = (item.get("download_info") or {}).get("dir_info", {}).get("editable")
        names.append(
            f"{metadata.get('name', '?')} {metadata.get('version', '?')}" + (" (editable)" if editable else "")
        )
    return f"    pip installed {len(names)} package(s): " + ", ".join(names)


def install_main(ns: argparse.Namespace) -> int:
    """``pip install --quiet`` plus one line naming what it installed (not a line per satisfied requirement)."""
    with tempfile.TemporaryDirectory(prefix="cecai-pip-") as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = [*_pip(ns.python), "install", "--quiet", "--disable-pip-version-check", "--report", str(report_path)]
        sys.stdout.flush()
        rc = subprocess.run([*cmd, *ns.args], check=False).returncode
        if rc != 0:
            return rc
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            print("    pip finished (it wrote no report of what it installed: pip >= 22.2 does)")
            return 0
    print(describe_install(report))
    return 0


def _latest_progress(log: Path) -> str:
    """The log's latest progress line (else its last line), shortened for one terminal line."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip()]
    progress = [match for match in map(_PROGRESS.match, lines) if match]
    if progress:
        # A compiler command line is long; its step counter and the file it makes say enough.
        step = progress[-1]
        return f"{step.group(1)} {Path(step.string.split()[-1]).name}"
    line = lines[-1] if lines else ""
    return line if len(line) <= 100 else line[:97] + "..."


def _elapsed(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def heartbeat_main(ns: argparse.Namespace) -> int:
    log = Path(ns.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"    {ns.what}: output in {log} (tail -f it for every line); a progress line every {ns.every:g} s")
    sys.stdout.flush()
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(ns.command, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def beat() -> None:
            while not done.wait(ns.every):
                print(f"    ... {_elapsed(time.monotonic() - started)}  {_latest_progress(log)}", flush=True)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            rc = 130
        finally:
            done.set()
            thread.join()
    took = _elapsed(time.monotonic() - started)
    if rc == 0:
        print(f"    {ns.what}: done in {took}")
        return 0
    if rc == 130:
        print(f"{ns.what}: interrupted after {took}; its output so far is in {log}", file=sys.stderr)
        return rc
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
    print("\n".join(["", *tail, ""]), file=sys.stderr)
    print(f"error: {ns.what} failed after {took} (exit {rc}); the whole output is in {log}", file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev_install.py", description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command_name", required=True)
    torch_cmd = sub.add_parser("torch", help="install torch's CPU build where it can, else say what pip will fetch")
    torch_cmd.add_argument("--python", default=sys.executable, help="the environment's interpreter (default: this)")
    torch_cmd.add_argument("--pin", help="the torch version (default: pyproject's torch==X)")
    torch_cmd.add_argument("--dry-run", action="store_true", help="print the decision as JSON, install nothing")
    install_cmd = sub.add_parser("install", help="pip install, quietly, then name what it installed")
    install_cmd.add_argument("--python", default=sys.executable, help="the environment's interpreter (default: this)")
    install_cmd.add_argument("args", nargs=argparse.REMAINDER, help="-- PIP_INSTALL_ARG ...")
    beat_cmd = sub.add_parser("heartbeat", help="run a long command, printing its progress now and then")
    beat_cmd.add_argument("--log", required=True, help="file for the command's whole output")
    beat_cmd.add_argument("--every", type=float, default=30.0, help="seconds between progress lines")
    beat_cmd.add_argument("--what", default="build", help="what the command does, for the messages")
    beat_cmd.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    ns = parser.parse_args(argv)
    if ns.command_name == "torch":
        return torch_main(ns)
    if ns.command_name == "install":
        ns.args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
        if not ns.args:
            parser.error("install needs pip install's arguments after --")
        return install_main(ns)
    ns.command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not ns.command:
        parser.error("heartbeat needs a command after --")
    return heartbeat_main(ns)


if __name__ == "__main__":
    sys.exit(main())
