"""Load and save model weights safely.

Teacher checkpoints come from users, so reading one must never run code: safetensors is
plain data, and everything else goes through ``torch.load(weights_only=True)``, whose
unpickler refuses arbitrary classes. A mismatch is reported before any tensor is copied,
naming the missing, unexpected and mis-shaped keys, so a wrong ``arch`` fails a job in
seconds with a message the user can act on.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import Tensor, nn

Source = str | os.PathLike[str] | bytes
# Checkpoints written by training loops nest the weights under one of these keys.
_NESTING_KEYS = ("model", "state_dict", "model_state")
_SHOW = 5  # keys listed per category in an error message


class WeightsError(ValueError):
    """The weights cannot be read (``reason="unreadable"``) or do not fit the model
    (``reason="mismatch"``); the worker maps these to ``teacher_unreadable``/``_mismatch``."""

    def __init__(self, message: str, *, reason: Literal["unreadable", "mismatch"]) -> None:
        super().__init__(message)
        self.reason = reason


def read_state_dict(source: Source) -> dict[str, Tensor]:
    """Read a flat ``{name: tensor}`` from a path or bytes (safetensors or torch checkpoint)."""
    data = source if isinstance(source, bytes) else _read_file(Path(source))
    if _looks_like_safetensors(data):
        try:
            raw: object = safetensors_load(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise WeightsError(f"not a valid safetensors file: {exc}", reason="unreadable") from exc
    else:
        try:
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # user-supplied bytes: any parse failure means "unreadable"
            raise WeightsError(
                f"not a weights-only torch checkpoint (objects other than tensors and plain "
                f"containers are refused): {exc}",
                reason="unreadable",
            ) from exc
    return _flatten(raw)


def load_weights(model: nn.Module, source: Source) -> None:
    """Load weights into ``model`` strictly; raises :class:`WeightsError` on any mismatch.

    Accepts nesting under ``model``/``state_dict``/``model_state`` and strips the ``module.``
    prefix that DistributedDataParallel adds. BatchNorm ``num_batches_tracked`` buffers may be
    absent (old checkpoints); everything else must match in name and shape.
    """
    state = read_state_dict(source)
    _check_compatible(model.state_dict(), state)
    model.load_state_dict(state, strict=False)  # strictness was checked above


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the state dict as safetensors (no pickle), CPU and contiguous."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(path))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}", reason="unreadable") from exc


def _looks_like_safetensors(data: bytes) -> bool:
    """safetensors = 8-byte little-endian header length, then a JSON header starting '{'."""
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return data[8:9] == b"{" and 8 + header_len <= len(data)


def _flatten(raw: object) -> dict[str, Tensor]:
    """Unwrap training-checkpoint nesting, strip DDP's ``module.``, insist on tensors only."""
    while isinstance(raw, Mapping):
        nested = next((raw[k] for k in _NESTING_KEYS if isinstance(raw.get(k), Mapping)), None)
        if nested is None:
            break
        raw = nested
    if not isinstance(raw, Mapping) or not raw:
        raise WeightsError("checkpoint holds no state dict", reason="unreadable")
    bad = [str(k) for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"checkpoint entries are not tensors: {', '.join(bad[:_SHOW])}", reason="unreadable"
        )
    state: dict[str, Tensor] = dict(raw)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check_compatible(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> None:
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = [
        f"{len(keys)} {label}: {', '.join(keys[:_SHOW])}{' ...' if len(keys) > _SHOW else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape-mismatched", mis_shaped),
        )
        if keys
    ]
    if parts:
        raise WeightsError("weights do not fit the model: " + "; ".join(parts), reason="mismatch")
