"""The stable error codes a failed job carries (docs/CONTRACTS.md, "Error codes").

Clients switch on ``error_code``; the human ``error_message`` may change between versions.
Codes starting with ``spec_``/``teacher_``/``dataset_`` are *user* errors: the same inputs
would fail again, so they are never retried. ``worker_lost`` is set by the reaper when a job
used up its attempts on workers that died.
"""

from __future__ import annotations

from typing import Final

ERROR_CODES: Final[tuple[str, ...]] = (
    "spec_invalid",
    "teacher_unreadable",
    "teacher_mismatch",
    "dataset_invalid",
    "dataset_empty",
    "storage_error",
    "export_parity",
    "out_of_memory",
    "internal",
    "worker_lost",
)
USER_ERROR_PREFIXES: Final[tuple[str, ...]] = ("spec_", "teacher_", "dataset_")


def is_user_error(code: str) -> bool:
    """True for codes caused by the job's inputs (never retried)."""
    return code.startswith(USER_ERROR_PREFIXES)


__all__ = ["ERROR_CODES", "USER_ERROR_PREFIXES", "is_user_error"]
