"""Resolve a job's inputs to local files and validate them before any training.

Why validate here when the engine would fail anyway: the engine's errors surface wherever
they happen (a label file with a bad value, read at iteration 3,000). Checking the teacher's
weights against its arch and scanning the dataset's files up front turns every bad input
into a user error in seconds, with a stable code (``teacher_unreadable``,
``teacher_mismatch``, ``dataset_invalid``, ``dataset_empty``), never after hours and never
retried.

URIs accepted: ``upload:<id>`` (a file uploaded to this service by the same team), anything
the object store understands (``s3://bucket/key``, ``file:///path``; a URI ending in ``/`` is
a directory prefix), and plain local paths (the embedded default, where the worker shares the
user's disk). Dataset archives (``.tar``, ``.tar.gz``, ``.zip``) are unpacked once into the
cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from jobs import storage
from jobs.models import Upload
from jobs.spec import JobSpec
from pcd_core.spec import RunSpec
from worker.archives import ArchiveError, extract_cached

if TYPE_CHECKING:
    from worker.runner import RunContext


def _failure(code: str, message: str) -> Exception:
    from worker.runner import JobFailure

    return JobFailure(code, message, user_error=True)


def dataset_code(exc: BaseException) -> str:
    """``dataset_empty`` or ``dataset_invalid`` for a ``DatasetError``."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code.startswith("dataset_"):
        return code
    text = str(exc).lower()
    return "dataset_empty" if ("no image" in text or "empty" in text) else "dataset_invalid"


def prepare(spec: JobSpec, ctx: RunContext) -> RunSpec:
    """The engine's spec with local paths, after the inputs passed validation."""
    data = spec.model_dump(mode="json", exclude={"resources"})
    cache = Path(ctx.settings.cache_dir).expanduser().resolve()
    ds_path = resolve_dataset(spec.dataset.uri, ctx, cache)
    data["dataset"]["uri"] = str(ds_path)
    if spec.teacher is not None and spec.teacher.checkpoint:
        data["teacher"]["checkpoint"] = str(resolve_file(spec.teacher.checkpoint, ctx, cache,
                                                         what="teacher"))
    run_spec = RunSpec.model_validate(data)
    ctx.row.log("info", f"dataset at {ds_path}")
    validate_teacher(run_spec)
    validate_data(run_spec, on_item=ctx.watchdog.alive)
    return run_spec


def validate_teacher(spec: RunSpec) -> None:
    """Load the teacher's weights into its arch on the CPU: unreadable or mismatched -> fail."""
    if spec.teacher is None or not spec.teacher.checkpoint:
        return
    from pcd_core.components import resolve_teacher_checkpoint
    from pcd_core.models import WeightsError, build_model_from_spec, load_weights

    try:
        model = build_model_from_spec(spec.teacher, spec.dataset.num_classes)
        load_weights(model, resolve_teacher_checkpoint(spec.teacher.checkpoint))
    except WeightsError as exc:
        raise _failure(f"teacher_{exc.reason}", str(exc)) from exc
    except ValueError as exc:  # TeacherMissingError and friends
        raise _failure("teacher_unreadable", str(exc)) from exc


def validate_data(spec: RunSpec, on_item: Callable[[], object] | None = None) -> None:
    """Scan the train and val splits (files present, stems matched, labels in range)."""
    from pcd_core.data import DatasetError, validate_dataset

    for split in (spec.dataset.train_split, spec.dataset.val_split):
        try:
            validate_dataset(spec.dataset, split, on_item=on_item)
        except DatasetError as exc:
            raise _failure(dataset_code(exc), f"{split}: {exc}") from exc


# -- URI resolution -------------------------------------------------------------------------
def resolve_dataset(uri: str, ctx: RunContext, cache: Path) -> Path:
    """A local dataset directory for ``uri`` (archives are unpacked into the cache)."""
    if uri.endswith("/") and "://" in uri:
        return _fetch_prefix(uri, ctx, cache)
    path = resolve_file(uri, ctx, cache, what="dataset", allow_dir=True)
    if path.is_dir():
        return path
    try:
        return extract_cached(path, cache, on_member=ctx.watchdog.alive)
    except ArchiveError as exc:
        raise _failure("dataset_invalid", str(exc)) from exc


def resolve_file(uri: str, ctx: RunContext, cache: Path, *, what: str,
                 allow_dir: bool = False) -> Path:
    """A local path for ``uri``: the file itself when local, else a cached download."""
    if uri.startswith("upload:"):
        key, sha256 = _upload(uri[len("upload:"):], ctx, what)
        return _fetch(ctx.store, key, cache, sha256, what, ctx)
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme else uri).expanduser()
        if path.is_file() or (allow_dir and path.is_dir()):
            return path.resolve()
        if parsed.scheme == "":
            raise _failure(_missing_code(what), f"{what} {uri} does not exist on the worker")
    return _fetch(storage.open_store(_store_root(uri, ctx)), uri, cache, None, what, ctx)


def _missing_code(what: str) -> str:
    return "teacher_unreadable" if what == "teacher" else "dataset_invalid"


def _upload(upload_id: str, ctx: RunContext, what: str) -> tuple[str, str | None]:
    with ctx.row.session() as s:
        upload = s.get(Upload, upload_id)
        # Another team's upload is as good as missing: ids must not leak across teams.
        if upload is None or (ctx.snap.team_id and upload.team_id != ctx.snap.team_id):
            raise _failure(_missing_code(what), f"upload {upload_id} not found")
        return upload.key, upload.sha256


def _store_root(uri: str, ctx: RunContext) -> str:
    """The store that holds ``uri``: the service's own, or the URI's bucket/root."""
    own = str(ctx.settings.storage_url).rstrip("/")
    if uri.startswith(own + "/"):
        return own
    parsed = urlparse(uri)
    return f"{parsed.scheme}://{parsed.netloc}"


def _fetch(store: Any, uri_or_key: str, cache: Path, sha256: str | None, what: str,
           ctx: RunContext) -> Path:
    try:
        return Path(storage.fetch_cached(store, uri_or_key, cache, sha256,
                                         on_chunk=ctx.watchdog.alive))
    except FileNotFoundError as exc:
        raise _failure(_missing_code(what), f"{what} {uri_or_key} not found in storage") \
            from exc


def _fetch_prefix(uri: str, ctx: RunContext, cache: Path) -> Path:
    """Download every object under a prefix (a dataset stored as a directory)."""
    store = storage.open_store(_store_root(uri, ctx))
    prefix = urlparse(uri).path.lstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    root = cache / "prefixes" / digest
    count = 0
    for obj in store.list(prefix):
        dest = root / obj.key[len(prefix):].lstrip("/")
        if not dest.exists() or dest.stat().st_size != obj.size:
            dest.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(obj.key, dest)
        ctx.watchdog.alive()
        count += 1
    if count == 0:
        raise _failure("dataset_empty", f"no objects under {uri}")
    return root
