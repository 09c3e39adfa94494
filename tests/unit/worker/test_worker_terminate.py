"""A pool child terminated mid-run (Celery's SIGTERM) must leave the job to the reaper.

Found by tests/integration/test_production.py (Redis restart): Celery terminated the child
of a running job on the connection loss; billiard's handler raised SystemExit inside
``torch.save``, whose cleanup turned it into ``RuntimeError: ... unexpected pos``, and the
runner recorded that as a permanent ``failed (internal)`` instead of letting the reaper
re-queue the job to resume from its checkpoint.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from billiard import common

from worker import jobrow
from worker.reaper import reap_once
from worker.runner import execute_job


def test_not_terminating_by_default() -> None:
    assert jobrow.process_terminating() is False


def test_a_failure_while_the_pool_terminates_the_child_is_not_recorded(
        world, dataset_dir, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    import pcd_core.train

    def terminated_mid_save(*args: Any, **kwargs: Any) -> None:
        # what billiard's SIGTERM handler does (without touching this process's handlers)...
        monkeypatch.setattr(common, "_should_have_exited", [True])
        try:
            raise SystemExit(-241)
        except SystemExit:  # ...and what torch.save's cleanup then raised instead
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "35347904 vs 35347800") from None

    monkeypatch.setattr(pcd_core.train, "run", terminated_mid_save)
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None))
    assert jobrow.process_terminating() is False
    with pytest.raises(SystemExit):
        execute_job(job_id, settings=world.settings, worker_id="w1")
    job = world.job(job_id)
    assert (job.status, job.error_code) == ("running", None)
    assert "terminated by its pool" in world.logs(job_id)

    # the reaper re-queues it once its heartbeat is stale, as after a SIGKILL
    world.update(job_id, heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=600))
    sent: list[tuple[str, str]] = []
    [reaped] = reap_once(world.settings, enqueue=lambda j, q: sent.append((j, q)))
    assert reaped.outcome == "requeued" and sent == [(job_id, "cpu")]


def test_an_ordinary_failure_is_still_recorded(
        world, dataset_dir, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    import pcd_core.train

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a real bug")

    monkeypatch.setattr(pcd_core.train, "run", broken)
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None))
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "failed"
    job = world.job(job_id)
    assert (job.status, job.error_code) == ("failed", "internal")
    assert "a real bug" in (job.error_message or "")
