"""The comparison run: :class:`SourceCheck` starts the source side's worker (transformers) beside the converter,
then runs the GGUF side's (llama.cpp) from the moment the source's tokenizer results are in, waits for both and
compares their results into a :class:`~cecai_converter.parity_record.SourceParity` record; :func:`check_source`
does both steps at once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..errors import SourceCheckFailed, UsageError, WorkerFailed
from ..fidelity import default_eval_text
from ..gguf_header import GGUFHeaderError, read_header
from ..output import get_logger
from ..parity_limits import MAX_NMSE
from ..parity_record import SourceParity
from ..processes import child_kwargs, describe_exit, failure_summary, quiet_abort_env, run_worker
from ..threads import lease_cores, machine_cores, worker_env
from .hyperparameters import compare_hyperparameters
from .logits import N_TOKENS, compare_saved_logits, logits_record
from .source_folder import RAM_BUDGET_ENV, float32_estimate, needs_remote_code, ram_budget, read_json, text_config
from .templates import compare_templates, conversations, gguf_templates
from .tokenizer import EARLY_FILE, SPECIAL_SAMPLE, compare_tokenizers, corpus_strings

#: The two workers (``python -m <module> --job FILE --result FILE``, :func:`cecai_converter.processes.serve_job`).
WORKERS: Final = {
    "source": "cecai_converter.source_parity.source_worker",
    "gguf": "cecai_converter.source_parity.gguf_worker",
}


def check_source(
    source: Path,
    gguf: Path,
    *,
    trust_remote_code: bool = False,
    eval_text: Path | None = None,
    limits: Mapping[str, float] | None = None,
    n_tokens: int = N_TOKENS,
    threads: int | None = None,
    timeout_s: float | None = None,
) -> SourceParity:
    """Compare ``gguf`` with the model folder ``source`` (see the package's docstring): :class:`SourceCheck`, started
    and finished at once.

    Args:
        source: a Hugging Face model folder (config.json, safetensors, tokenizer files).
        gguf: the GGUF to judge (the run's base).
        trust_remote_code: let transformers run the repository's own code where the model needs it.
        eval_text: the text the logits are compared on (default: the shipped evaluation text).
        limits: ``max_nmse`` (default :data:`MAX_NMSE`), and optionally ``max_kld`` and ``min_top1``.
        n_tokens: tokens of the text compared.
        threads: CPU threads for torch and llama.cpp (default: theirs).
        timeout_s: a time limit for each side.

    Returns:
        The record; ``passed`` False with ``failures`` when something differs.

    Raises:
        UsageError: a file is missing or unreadable (exit 2).
        SourceCheckFailed: a side could not be run (a crash, a timeout, a file llama.cpp cannot load).
    """
    check = SourceCheck(
        source, trust_remote_code=trust_remote_code, eval_text=eval_text, limits=limits, n_tokens=n_tokens,
        threads=threads, timeout_s=timeout_s,
    )  # fmt: skip
    with check:
        return check.finish(gguf)


class SourceCheck:
    """One comparison with a source model, in two steps: :meth:`start` runs the source side (transformers) in a
    worker process in the background, :meth:`finish` runs the GGUF side beside what is left of it (from the moment
    the source's tokenizer results are in), waits for both and compares.

    The source side does not need the GGUF, so a conversion starts it before the converter writes the base and the
    two overlap; when memory is short (the source model's float32 size twice over the budget) it starts only in
    :meth:`finish`, after the converter is done. :meth:`stop` (also on leaving a ``with`` block) ends a worker still
    running, with everything it started, and removes the temporary files: a failed conversion or Ctrl-C leaves
    nothing behind.

    Raises (constructor):
        UsageError: the folder has no readable config.json, or the evaluation text is missing.
    """

    def __init__(
        self,
        source: Path,
        *,
        trust_remote_code: bool = False,
        eval_text: Path | None = None,
        limits: Mapping[str, float] | None = None,
        n_tokens: int = N_TOKENS,
        threads: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.source = Path(source)
        self.config = read_json(self.source / "config.json")
        if not self.config:
            raise UsageError(
                f"source check: {self.source / 'config.json'} is missing or not a JSON object",
                hint="give the model folder the GGUF was converted from (config.json, weights, tokenizer)",
            )
        self.text_path = Path(eval_text) if eval_text is not None else _default_eval_text()
        if not self.text_path.is_file():
            raise UsageError(f"source check: the evaluation text {self.text_path} is missing")
        self.trust_remote_code = trust_remote_code
        self.limits = {"max_nmse": MAX_NMSE, **(limits or {})}
        self.threads, self.timeout_s = threads, timeout_s
        trained = next((v for k in ("max_position_embeddings", "n_positions", "n_ctx")
                        if isinstance(v := text_config(self.config).get(k), int) and v > 0), 0)  # fmt: skip
        self.n_tokens = min(n_tokens, trained) if trained else n_tokens
        self.remote = needs_remote_code(self.config, "AutoModelForCausalLM")
        self.estimate = float32_estimate(self.source)
        self.budget = ram_budget()
        self.logits_reason: str | None = None
        if self.estimate > self.budget:
            self.logits_reason = (
                f"the source model needs about {self.estimate / 2**30:.1f} GiB in float32 and "
                f"{self.budget / 2**30:.1f} GiB are available ({RAM_BUDGET_ENV} or MemAvailable): its logits were "
                "not compared"
            )
        self.strings = corpus_strings()
        self._work: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._started = 0.0
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> SourceCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, background: bool = True) -> SourceCheck:
        """Start the source side's worker (once). With ``background``, not while memory is short (see above)."""
        if self._proc is not None or self._result is not None:
            return self
        if background and self.logits_reason is None and 2 * self.estimate > self.budget:
            return self  # the converter and the source model would not fit together: finish() starts it later
        self._work = Path(tempfile.mkdtemp(prefix="cecai-parity-"))
        job = {"role": "source", "source": str(self.source), "strings": self.strings, "text": str(self.text_path),
               "n_tokens": self.n_tokens, "logits": self.logits_reason is None,
               "trust_remote_code": self.trust_remote_code, "remote_class": self.remote, "work": str(self._work),
               "threads": self.threads, "conversations": conversations()}  # fmt: skip
        (self._work / "source-job.json").write_text(json.dumps(job), encoding="utf-8")
        argv = [sys.executable, "-m", WORKERS["source"], "--job", str(self._work / "source-job.json"),
                "--result", str(self._work / "source-result.json")]  # fmt: skip
        self._log = (self._work / "source.log").open("wb")
        self._started = time.monotonic()
        # Cores from the machine-wide lease (threads.py), held by the worker itself. It asks for half of them: it
        # runs beside the converter or the GGUF side, which share the machine with it instead of waiting for it.
        share = self.threads or max(1, machine_cores() // 2)
        with lease_cores(share, on_wait=_log.info) as cores:
            env = {**quiet_abort_env(), **os.environ, **worker_env(cores.threads), "CUDA_VISIBLE_DEVICES": ""}
            # The worker protocol of processes.run_worker (serve_job on the other side), started without waiting: its
            # own process group (stop() ends all of it), killed with this process.
            self._proc = subprocess.Popen(  # not run_tool: it runs beside the converter; run_worker would wait
                argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, pass_fds=tuple(cores.fds), **child_kwargs(),
            )  # fmt: skip
        return self

    def stop(self) -> None:
        """End the source side's worker if it still runs (and all it started); remove the temporary files."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        self._proc = None

    def _early_side(self) -> dict[str, Any]:
        """The source side's tokenizer results, as soon as the worker has them (starting it if it is not running);
        the whole result when the worker has ended first."""
        if self._result is not None:
            return self._result
        self.start(background=False)
        assert self._proc is not None and self._work is not None
        early = self._work / EARLY_FILE
        waited = time.monotonic()
        while not early.is_file() and self._proc.poll() is None:
            if self.timeout_s is not None and time.monotonic() - waited > self.timeout_s:
                break  # _source_side() reports the timeout
            time.sleep(_POLL_S)
        try:
            data = json.loads(early.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return self._source_side()  # the worker ended without it: its result, or why it failed
        return data if isinstance(data, dict) else self._source_side()

    def _source_side(self) -> dict[str, Any]:
        """The source side's result: wait for the worker (starting it if it is not running)."""
        if self._result is not None:
            return self._result
        self.start(background=False)
        assert self._proc is not None and self._work is not None
        try:
            code = self._proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise SourceCheckFailed(
                f"source check: the source model (transformers) was not evaluated within {self.timeout_s:g} s",
                hint=_FAILED_HINT,
            ) from None
        seconds = time.monotonic() - self._started
        self._log.close()
        self._log = None
        tail = (self._work / "source.log").read_text(encoding="utf-8", errors="replace")[-_TAIL_CHARS:]
        for line in tail.splitlines():
            _log.debug(line)
        try:
            reply = json.loads((self._work / "source-result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            reply = None
        if isinstance(reply, dict) and reply.get("ok") is True and code == 0:
            self._result = {**reply["result"], "seconds": round(seconds, 3)}
            return self._result
        if isinstance(reply, dict) and reply.get("ok") is False:
            why = str(reply.get("error") or "no reason given")
        else:
            why = f"the worker {describe_exit(code)} ({failure_summary(tail)})"
        raise SourceCheckFailed(f"source check: the source model (transformers) could not be evaluated: {why}",
                                hint=_FAILED_HINT)  # fmt: skip

    def finish(self, gguf: Path) -> SourceParity:
        """Compare ``gguf`` with the source (waiting for the source side), and return the record.

        Raises:
            UsageError: ``gguf`` is not a readable GGUF file.
            SourceCheckFailed: a side could not be run.
        """
        started = time.perf_counter()
        gguf = Path(gguf)
        try:
            header = read_header(gguf)
        except (OSError, GGUFHeaderError) as exc:
            raise UsageError(f"source check: {gguf} is not a readable GGUF file ({exc})") from None
        arch = str(header.metadata.get("general.architecture", ""))
        n_ctx_train = int(header.metadata.get(f"{arch}.context_length", 0) or 0)
        # The GGUF side needs only the source's tokenizer results, which the source worker writes before it loads
        # the model: it runs beside the rest of the source side (the forward pass), not after it.
        early = self._early_side()
        assert self._work is not None
        logits_reason = self.logits_reason or (str(early["logits_reason"]) if early.get("logits_reason") else None)
        all_strings = [*self.strings, *early.get("added_strings", [])]
        if "eval_text" in early:
            all_strings.append(early["eval_text"])
        tokens = list(early.get("eval_tokens") or [])
        if n_ctx_train > 0:
            tokens = tokens[:n_ctx_train]
        gguf_job = {"role": "gguf", "model": str(gguf), "strings": all_strings, "sample": SPECIAL_SAMPLE,
                    "source_encodings": early.get("encodings"), "tokens": tokens if logits_reason is None else None,
                    "work": str(self._work), "threads": self.threads, "conversations": conversations()}  # fmt: skip
        ggf = _GGUFSide(gguf_job, self.timeout_s)
        try:
            src = self._source_side()
        except SourceCheckFailed:
            ggf.join()  # it writes into the work folder, which stop() removes; an interrupt does not wait for it
            raise
        ggf.join()
        ggf.raise_failure()
        logits_reason = logits_reason or (str(src["logits_reason"]) if src.get("logits_reason") else None)
        if logits_reason is None and tokens:
            ggf.result["logits"] = compare_saved_logits(self._work, len(tokens))
        failures: list[str] = []
        tokenizer = compare_tokenizers(src, ggf.result, all_strings, failures)
        template = compare_templates(src, ggf.result, gguf_templates(header.metadata), failures)
        hyper = compare_hyperparameters(self.config, header.metadata)
        for diff in hyper["differing"]:
            failures.append(
                f"the {diff['name']} differs: source {diff['source']!r} (config.json {diff['source_key']}), "
                f"GGUF {diff['gguf']!r} ({diff['gguf_key']})"
            )
        logits = logits_record(ggf.result, logits_reason, self.limits, self.remote, self.trust_remote_code, failures)
        return SourceParity(
            checked=True,
            passed=not failures,
            failures=tuple(failures),
            base=gguf.name,
            tokenizer=tokenizer,
            chat_template=template,
            hyperparameters=hyper,
            logits=logits,
            trust_remote_code=self.trust_remote_code,
            timings={
                "total_s": round(time.perf_counter() - started, 3),
                "source_s": src.get("seconds"),
                "gguf_s": ggf.result.get("seconds"),
            },
        )


_FAILED_HINT: Final = (
    "the log has the worker's output (-v shows it); --no-source-check (SOURCE_CHECK: false) converts without this "
    "check, and the manifest says so"
)
_TAIL_CHARS: Final = 6000
#: Seconds between two looks for the source worker's tokenizer results.
_POLL_S: Final = 0.05
_log = get_logger("source_parity")


def _default_eval_text() -> Path:

    return default_eval_text()


def _side(role: str, job: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Run one side's worker; its result, with the seconds it took under ``seconds``."""
    what = "the source model (transformers)" if role == "source" else "the GGUF (llama.cpp)"
    try:
        run = run_worker(
            WORKERS[role],
            job,
            timeout=timeout_s,
            name=f"source check ({role})",
            env={"CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE"},
        )
        return {**run.data, "seconds": round(run.seconds, 3)}
    except WorkerFailed as exc:
        raise SourceCheckFailed(
            f"source check: {what} could not be evaluated: {exc.reason}"
            + (f" ({exc.summary})" if exc.summary and exc.kind != "usage" else ""),
            hint="the log has the worker's output (-v shows it live); --no-source-check (SOURCE_CHECK: false) "
            "converts without this check, and the manifest says so",
        ) from None


class _GGUFSide:
    """The GGUF side's worker (:func:`_side`), run from a thread so that the parent can wait for the source side
    meanwhile: each side is a process of its own, holding its own cores (threads.py)."""

    def __init__(self, job: dict[str, Any], timeout_s: float | None) -> None:
        self.result: dict[str, Any] = {}
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job, timeout_s), name="source-check-gguf", daemon=True)
        self._thread.start()

    def _run(self, job: dict[str, Any], timeout_s: float | None) -> None:
        try:
            self.result = _side("gguf", job, timeout_s)
        except BaseException as exc:  # handed to the caller's thread by raise_failure()
            self._failure = exc

    def join(self) -> None:
        self._thread.join()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
