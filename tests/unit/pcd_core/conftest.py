"""Fixtures the engine's training tests share (train_helpers holds the specs and recorders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import write_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic folder dataset, written once per test module."""
    return write_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def one_thread() -> None:
    """One torch thread: the tiny runs are faster so on two shared cores, and deterministic
    runs compare equal whatever the machine's core count."""
    torch.set_num_threads(1)
