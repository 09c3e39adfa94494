"""Resumable training checkpoints: a self-describing dict of tensors and primitives.

A checkpoint is loaded with ``torch.load(weights_only=True)`` (no code runs on load), so
everything in it is a tensor, a number, a string, or a list/dict/tuple of those. The RNG
states of numpy and Python ``random`` are converted to that vocabulary here. Writes are
atomic (temporary file + ``os.replace``) so a worker killed mid-write never leaves a torn
checkpoint where the reaper will look for one to resume from.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LATEST = "last.pt"


def capture_rng() -> dict[str, Any]:
    """Every RNG the loop and the data pipeline may draw from, in weights-only-safe form."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),  # uint8 tensor
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),  # (624,) uint32 as int64
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        # python random: version, 625 32-bit words (624 state + position), gauss_next
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; CUDA states are restored only if CUDA is present."""
    torch.set_rng_state(state["torch"])
    npd = state["numpy"]
    np.random.set_state(
        ("MT19937", npd["keys"].numpy().astype(np.uint32), npd["pos"], npd["has_gauss"],
         npd["cached_gaussian"])
    )
    pyd = state["python"]
    random.setstate((pyd["version"], tuple(int(v) for v in pyd["internal"].tolist()),
                     pyd["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` atomically; returns the final path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights only, onto the CPU)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version!r}, expected {FORMAT_VERSION}")
    return state


def resolve_resume(resume: str | os.PathLike[str] | None, out_dir: Path) -> Path | None:
    """``resume`` may be a checkpoint file, a run directory, or ``"auto"`` (this run's last
    checkpoint if there is one, else a fresh start)."""
    if resume is None:
        return None
    if str(resume) == "auto":
        candidate = out_dir / CHECKPOINT_DIR / LATEST
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if path.is_dir():
        for candidate in (path / CHECKPOINT_DIR / LATEST, path / LATEST):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no checkpoint under {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path
