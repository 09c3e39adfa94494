"""A job run inside Celery's prefork pool must be able to start DataLoader workers."""

from __future__ import annotations

import multiprocessing as mp

from worker.celery_app import allow_child_processes


def _noop() -> None:
    return None


def _spawn_grandchild(allow: bool, result: mp.Queue) -> None:  # type: ignore[type-arg]
    if allow:
        allow_child_processes()
    try:
        child = mp.get_context("fork").Process(target=_noop)
        child.start()
        child.join(10)
        result.put(("ok", child.exitcode))
    except AssertionError as exc:  # multiprocessing's refusal inside a daemon
        result.put(("refused", str(exc)))


def _run_in_daemon(allow: bool) -> tuple[str, object]:
    ctx = mp.get_context("fork")
    result: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    proc = ctx.Process(target=_spawn_grandchild, args=(allow, result), daemon=True)
    proc.start()
    outcome = result.get(timeout=30)
    proc.join(10)
    return outcome


def test_daemon_child_is_refused_children_without_the_fix() -> None:
    status, message = _run_in_daemon(allow=False)
    assert status == "refused" and "daemonic" in str(message)


def test_allow_child_processes_lets_a_daemon_child_start_workers() -> None:
    assert _run_in_daemon(allow=True) == ("ok", 0)
