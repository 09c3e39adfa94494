"""The FastAPI application factory.

Why a factory: tests build one app per temporary database and store, with a recording
dispatcher, without touching the environment; production builds exactly one from the shared
``jobs.settings``. ``app`` is built lazily on first access (``uvicorn api.main:app``), so merely
importing this module opens no database, creates no folders and loads no heavy library.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api.dispatch import Dispatcher, KombuDispatcher
from api.metrics import JobsCollector, MetricsMiddleware, request_histogram
from api.problems import Problem, register_problem_handlers
from api.routes import artifacts, health, jobs, uploads
from jobs import db, service
from jobs.settings import Settings, get_settings
from jobs.storage import open_store

log = logging.getLogger(__name__)

API_VERSION = "1"
API_STORAGE_RETRY_S = 5.0  # seconds an API request keeps retrying a failed S3 request
TAGS = [
    {"name": "jobs", "description": "Submit, follow and cancel distillation jobs."},
    {"name": "artifacts", "description": "Download what a job produced."},
    {"name": "uploads", "description": "Upload teacher checkpoints and datasets."},
    {"name": "operations", "description": "Health, readiness and Prometheus metrics."},
]


def _install_metrics(app: FastAPI) -> None:
    registry = CollectorRegistry()
    histogram = request_histogram(registry)
    sessionmaker = app.state.sessionmaker

    def status_counts() -> dict[str, int]:
        with sessionmaker() as session:
            return dict(service.status_counts(session))

    def queued_by_queue() -> dict[str, int]:
        with sessionmaker() as session:
            return dict(service.queued_by_queue(session))

    registry.register(JobsCollector(status_counts, queued_by_queue, service.STATUSES))
    app.state.registry = registry
    app.add_middleware(MetricsMiddleware, histogram=histogram)


def _bootstrap_key(app: FastAPI) -> None:
    """Register ``PCD_BOOTSTRAP_API_KEY`` so a fresh deployment is usable at once."""
    with db.session_scope(app.state.sessionmaker) as session:
        service.ensure_bootstrap_key(session, app.state.settings)


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None,
               store: Any | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: the environment's ``PCD_*``).

    ``dispatcher`` and ``store`` replace the broker and object store built from the settings
    (tests pass a recording dispatcher, or a broken store to check readiness).
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_start:
            # Alembic is synchronous and may take a moment on PostgreSQL: keep the loop free.
            await anyio.to_thread.run_sync(db.upgrade_to_head, settings)
        if settings.bootstrap_api_key is not None:
            await anyio.to_thread.run_sync(_bootstrap_key, app)
        yield
        app.state.engine.dispose()

    app = FastAPI(
        title="PCD distillation service",
        version=API_VERSION,
        summary="Distil large segmentation teachers into small deployable students.",
        openapi_tags=TAGS,
        lifespan=lifespan,
        responses={500: {"model": Problem, "description": "Internal error"}},
    )
    app.state.settings = settings
    app.state.engine = db.make_engine(settings.database_url)
    app.state.sessionmaker = db.make_sessionmaker(app.state.engine)
    # The API answers people and load balancers: a request may wait a few seconds for S3,
    # not the workers' two minutes (PCD_S3_RETRY_S), and /readyz must say so quickly.
    app.state.store = store if store is not None else open_store(
        settings.storage_url, retry_s=API_STORAGE_RETRY_S)
    app.state.dispatcher = dispatcher or KombuDispatcher(
        settings.broker_url, settings.work_dir, settings.visibility_timeout_s)
    app.state.sse_poll_s = 1.0
    app.state.sse_heartbeat_s = 15.0
    app.state.sse_max_s = 3600.0

    register_problem_handlers(app)
    _install_metrics(app)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(uploads.router)
    app.include_router(health.router)
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    """``api.main.app``, built on first access and cached (what ``uvicorn api.main:app`` reads)."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
