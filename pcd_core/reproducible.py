"""What makes a run reproducible and exactly resumable: the data order as a pure function
of (seed, epoch), evaluation that moves no RNG, and global seeding.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pcd_core.checkpoint import capture_rng, restore_rng


class BatchStream:
    """Endless training batches whose order is a pure function of (seed, epoch).

    Before each epoch the sampler's epoch is set (DistributedSampler) and every torch
    Generator the loader owns is reseeded from (seed, epoch), so the permutation and the
    worker seeds of epoch ``e`` never depend on what ran before. ``seek(i)`` positions the
    stream at step ``i`` by skipping whole batches of the current epoch (cheap: < 1 epoch).
    """

    def __init__(self, loader: Any, seed: int) -> None:
        if len(loader) == 0:
            raise ValueError("the training set has fewer images than one batch")
        self.loader, self.seed = loader, seed
        self.steps_per_epoch = len(loader)
        self._it: Iterator[Any] | None = None
        self._epoch = 0

    def seek(self, step: int) -> None:
        self._epoch, skip = divmod(step, self.steps_per_epoch)
        self._it = self._epoch_iter(self._epoch)
        for _ in range(skip):
            next(self._it)

    def __next__(self) -> Any:
        if self._it is None:
            self.seek(0)
        assert self._it is not None
        try:
            return next(self._it)
        except StopIteration:
            self._epoch += 1
            self._it = self._epoch_iter(self._epoch)
            return next(self._it)

    def __iter__(self) -> BatchStream:
        return self

    def _epoch_iter(self, epoch: int) -> Iterator[Any]:
        sampler = getattr(self.loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        epoch_seed = (self.seed * 1_000_003 + epoch) % (2**63)
        for g in self._generators(sampler):
            g.manual_seed(epoch_seed)
        return iter(self.loader)

    def _generators(self, sampler: Any) -> list[torch.Generator]:
        """The loader's and the sampler's generators, created if absent: without one they
        would draw from the global RNG and the order would depend on the training so far."""
        if getattr(self.loader, "generator", None) is None:
            self.loader.generator = torch.Generator()  # worker seeds
        if sampler is not None and hasattr(sampler, "generator") and sampler.generator is None:
            sampler.generator = torch.Generator()  # RandomSampler's permutation
        found = [self.loader.generator, getattr(sampler, "generator", None)]
        unique = {id(g): g for g in found if isinstance(g, torch.Generator)}
        return list(unique.values())


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block (evaluation) without moving any RNG, so evaluating or not evaluating at an
    iteration never changes the training that follows (and resumes stay exact)."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
