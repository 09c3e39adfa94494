"""Progress reporting and cooperative cancellation for a training run.

The loop knows nothing of who listens: the worker writes progress to the job row, the CLI
draws a tqdm bar, tests record losses. Each implements only the hooks it needs by
subclassing :class:`Callback`, whose methods are no-ops. Only rank 0 of a distributed run
calls them (``should_stop`` is then broadcast so every rank stops at the same iteration).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

Phase = Literal["preparing", "scoring", "training", "evaluating", "exporting"]


@dataclass(frozen=True)
class Progress:
    """A snapshot of a run. ``losses`` are means over the iterations since the last report,
    by part (``ce``, ``aux``, ``kd``, ``cwd``, ``pcd``) plus ``total``; units are per pixel."""

    phase: Phase
    iteration: int
    max_iterations: int
    losses: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    eta_s: float | None = None
    lr: float | None = None


class RunCancelled(Exception):
    """``should_stop()`` returned True. During or after training a resumable checkpoint was
    written first (``checkpoint``); a stop during the scoring pass, before the first step,
    has nothing to save (``checkpoint`` is None, ``iteration`` 0)."""

    def __init__(self, iteration: int, checkpoint: Path | None) -> None:
        super().__init__(f"run cancelled at iteration {iteration} (checkpoint: {checkpoint})")
        self.iteration = iteration
        self.checkpoint = checkpoint


class StopRequested(Exception):
    """``should_stop()`` said yes inside a phase other than the training steps (the scoring
    pass, an evaluation, between export formats). The phase raises it and unwinds its own
    state; :func:`pcd_core.train.run` turns it into :class:`RunCancelled` with the iteration
    and checkpoint, so callers only ever see ``RunCancelled``."""

    def __init__(self, phase: str) -> None:
        super().__init__(f"stop requested during {phase}")
        self.phase = phase


class Callback:
    """Hooks called by :func:`pcd_core.train.run`; override only what you need."""

    def on_progress(self, progress: Progress) -> None:
        """Every ``train.log_every`` iterations and at each phase change."""

    def on_eval(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        """After each evaluation of the student on the validation split."""

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        """After a checkpoint has been written atomically (safe to upload now)."""

    def should_stop(self) -> bool:
        """Polled every few iterations, before every scoring batch, every few evaluation
        batches and between export formats; True stops the run (after a checkpoint when
        training has started)."""
        return False


class CallbackList(Callback):
    """Fans every hook out to several callbacks; ``should_stop`` is true if any says so."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_progress(self, progress: Progress) -> None:
        for cb in self.callbacks:
            cb.on_progress(progress)

    def on_eval(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_eval(iteration, metrics)

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(iteration, path)

    def should_stop(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)


class TqdmCallback(Callback):
    """A progress bar for terminals: iteration, loss parts, img/s, ETA, latest mIoU."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file or sys.stderr
        self._bar: Any = None
        self._miou: float | None = None

    def on_progress(self, progress: Progress) -> None:
        from tqdm import tqdm

        if progress.phase != "training":
            if self._bar is not None and progress.phase == "exporting":
                self._bar.close()
                self._bar = None
            print(f"[pcd] {progress.phase}", file=self._file, flush=True)
            return
        if self._bar is None:
            self._bar = tqdm(total=progress.max_iterations, file=self._file, unit="it",
                             dynamic_ncols=True)
        self._bar.n = progress.iteration
        if not progress.losses:  # the phase-change event: nothing measured yet
            self._bar.refresh()
            return
        post = {k: f"{v:.3f}" for k, v in progress.losses.items()}
        post["img/s"] = f"{progress.images_per_s:.1f}"
        if self._miou is not None:
            post["mIoU"] = f"{self._miou:.3f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.refresh()

    def on_eval(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        self._miou = float(metrics["miou"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
