"""bench/reliability.py: which checkpoint a drained job was handed back at, read from its log.

The line is worker/outputs.py's; the drain bench reads size and upload seconds from it, so a
grace period is sized from measured checkpoints rather than guessed.
"""

from __future__ import annotations

from bench.reliability import _release_checkpoint

LOG = """\
attempt 1 started on worker w1:123
checkpoint at iteration 6 uploaded (171.3 MB in 0.84 s)
checkpoint at iteration 9 uploaded (171.4 MB in 1.07 s)
released at iteration 9: this worker is shutting down; the job goes back to the queue
attempt 2 started on worker w2:456
attempt 2: resuming from checkpoint at iteration 9
checkpoint at iteration 12 uploaded (171.4 MB in 0.91 s)
"""


def test_the_release_checkpoint_is_the_one_at_the_released_iteration() -> None:
    assert _release_checkpoint(LOG) == (171.4, 1.07)


def test_a_job_never_released_has_none() -> None:
    assert _release_checkpoint(LOG.replace("released at", "stopped at")) == (None, None)


def test_a_release_without_its_upload_line_has_none() -> None:
    text = LOG.replace("checkpoint at iteration 9 uploaded (171.4 MB in 1.07 s)\n", "")
    assert _release_checkpoint(text) == (None, None)
