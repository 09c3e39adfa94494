"""The one exception the data package raises for bad data, carrying a job error code."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

ErrorCode = Literal["dataset_invalid", "dataset_empty"]


class DatasetError(ValueError):
    """Bad or missing data. The message names the offending file or directory.

    ``code`` is the job error code of CONTRACTS.md (``dataset_empty`` when a split has no
    images, ``dataset_invalid`` otherwise); both are user errors that are never retried.
    Subclasses ValueError so that callers catching spec/data errors as ValueError see it.
    """

    def __init__(
        self, message: str, *, path: str | Path | None = None,
        code: ErrorCode = "dataset_invalid",
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.code: ErrorCode = code
