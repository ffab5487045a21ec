"""The thread policy (threads.py): one place decides each worker's threads, workers never hold more cores than the
machine has (across processes, through flock'd slot files held by the workers themselves), and every worker runs
with a passive OpenMP wait. Real processes and real locks; the llama.cpp test loads a real GGUF."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cecai_converter import threads
from cecai_converter.processes import run_tool, run_worker
from cecai_converter.threads import grant, lease_cores, machine_cores, worker_env, worker_threads


@pytest.fixture
def slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private slot folder and a 2-core machine, for this test only."""
    folder = tmp_path / "slots"
    monkeypatch.setenv(threads.SLOTS_ENV, str(folder))
    monkeypatch.setenv(threads.CORES_ENV, "2")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    yield folder


@pytest.mark.parametrize(
    ("requested", "cores", "free", "expected"),
    [
        (None, 8, 8, (8, 8)),  # alone: every core
        (None, 8, 3, (3, 3)),  # others hold 5: the 3 left, never more in total than cores
        (None, 8, 0, (1, 1)),  # none free: one (lease_cores waits for it)
        (4, 8, 8, (4, 4)),  # --threads 4: four
        (4, 8, 2, (2, 4)),  # --threads 4 with 2 free: the user's count runs, holding what is free
        (16, 8, 8, (8, 16)),  # more than cores: the user asked for it; the lease holds at most every core
    ],
)
def test_grant_is_the_free_cores_or_the_users_count(
    requested: int | None, cores: int, free: int, expected: tuple[int, int]
) -> None:
    assert grant(requested, cores, free) == expected


def test_grant_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="cores must be"):
        grant(None, 0, 0)
    with pytest.raises(ValueError, match="requested"):
        grant(0, 4, 4)


def test_worker_env_sets_a_passive_wait_and_the_count_everywhere() -> None:
    env = worker_env(3, environ={})
    assert env == {
        "CECAI_THREADS": "3",
        "OMP_NUM_THREADS": "3",
        "OPENBLAS_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    # a policy the caller chose on purpose is kept
    assert worker_env(1, environ={"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"


def test_worker_threads_prefers_the_job_then_the_grant_then_the_cores() -> None:
    assert worker_threads(5, environ={"CECAI_THREADS": "2"}) == 5
    assert worker_threads(None, environ={"CECAI_THREADS": "2"}) == 2
    assert worker_threads(True, environ={"CECAI_THREADS": "2"}) == 2  # a bool is no count
    assert worker_threads(None, environ={"CECAI_CORES": "3"}) == 3


def test_machine_cores_reads_the_override_and_ignores_garbage() -> None:
    assert machine_cores({"CECAI_CORES": "7"}) == 7
    real = machine_cores({})
    assert real >= 1
    assert machine_cores({"CECAI_CORES": "lots"}) == real
    assert machine_cores({"CECAI_CORES": "0"}) == real


def test_two_leases_never_hold_more_than_the_cores_and_the_second_waits(slots: Path) -> None:
    waits: list[str] = []
    with lease_cores() as first:
        assert len(first.fds) == 2 and first.threads == 2

        def sleep(_s: float) -> None:  # the first lease ends while the second waits for a core
            first.release()

        with lease_cores(on_wait=waits.append, sleep=sleep) as second:
            assert second.threads == 2
    assert waits and "all 2 are used" in waits[0]


def test_a_lease_is_shared_with_what_is_free(slots: Path) -> None:
    with lease_cores(1) as one, lease_cores() as rest:
        assert (len(one.fds), one.threads) == (1, 1)
        assert (len(rest.fds), rest.threads) == (1, 1)


def test_the_child_holds_the_cores_until_it_ends(slots: Path) -> None:
    """The parent's copies are closed once the child started; the cores are busy while it runs, free after."""
    done = threading.Event()

    def child() -> None:
        with lease_cores() as cores:
            run_tool(["sleep", "1.5"], cores=cores)
        done.set()

    thread = threading.Thread(target=child)
    thread.start()
    time.sleep(0.5)
    assert not done.is_set()
    assert _free_now() == 0, "the running child's cores were free to another lease"
    thread.join()
    with lease_cores() as after:
        assert len(after.fds) == 2


def _free_now() -> int:
    """How many of the 2 slots are free right now, without waiting."""
    folder = threads.slots_folder()
    assert folder is not None
    fds = threads._try_slots(folder, 2, 2)
    for fd in fds:
        os.close(fd)
    return len(fds)


def test_the_lease_is_off_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(threads.SLOTS_ENV, "off")
    monkeypatch.setenv(threads.CORES_ENV, "3")
    with lease_cores() as cores:
        assert (cores.fds, cores.threads) == ([], 3)


def test_the_threads_and_the_policy_reach_a_real_worker(slots: Path) -> None:
    """The worker protocol end to end: a worker process reports its job's filled-in thread count, its variables,
    the slot files it holds, and what libgomp (the OpenMP runtime llama.cpp links) will use."""
    with lease_cores(1):  # another worker holds one of the two cores
        seen = run_worker("cecai_converter.threads", {"threads": None}, timeout=60).data
    assert seen["threads"] == 1
    assert seen["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert seen["env"]["OMP_NUM_THREADS"] == seen["env"]["CECAI_THREADS"] == "1"
    assert len(seen["held"]) == 1
    if seen["omp_max_threads"] is not None:
        assert seen["omp_max_threads"] == 1
    asked = run_worker("cecai_converter.threads", {"threads": None}, timeout=60, threads=3).data
    assert asked["threads"] == 3 and len(asked["held"]) == 2  # --threads 3 runs 3, holding the 2 cores


@pytest.mark.slow
def test_a_real_llama_cpp_worker_waits_for_a_core(slots: Path, tiny_llama: Path, tmp_path: Path) -> None:
    """verify's llama.cpp worker on a real GGUF does not start while every core is held, and runs once one is."""
    from conftest import convert_to_f32

    from cecai_converter.verify import load_check

    gguf = convert_to_f32(tiny_llama, tmp_path / "tiny.gguf")
    result: list[object] = []
    with lease_cores() as held:
        thread = threading.Thread(target=lambda: result.append(load_check(gguf)))
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and not result, "the worker ran while every core was held"
    thread.join(timeout=120)
    assert result and result[0].generated_tokens  # type: ignore[attr-defined]
    assert held.fds == []
