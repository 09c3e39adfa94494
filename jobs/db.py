"""Engines, sessions and migrations.

Two ways to get a session:

- the process default, built lazily from ``jobs.settings.get_settings()``: ``session_scope()``
  (the worker, the reaper, the CLI);
- explicit objects: ``make_engine(url)`` + ``make_sessionmaker(engine)`` (the API app keeps
  its own on ``app.state`` so tests can run one app per temporary database).

SQLite (the embedded default) is configured on every connection: WAL (readers never block
the writer), ``busy_timeout`` (a writer waits for the lock instead of failing at once) and
``foreign_keys=ON``. The pysqlite driver's default transaction handling is kept on purpose:
it opens a transaction only before the first write, so a long request that reads and later
writes (an upload) does not hold a stale read snapshot that SQLite would refuse to upgrade.

PostgreSQL: ``postgresql+psycopg://user:pw@host/db`` (psycopg 3), pre-ping on, default pool.

Sessions use ``expire_on_commit=False``: objects returned from a ``session_scope()`` keep
their loaded values after it commits (read them, do not rely on them being fresh).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from jobs.settings import Settings, get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str, *, sqlite_foreign_keys: bool = True, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the per-backend settings above.

    For a SQLite file the parent folder is created. ``sqlite_foreign_keys=False`` is for
    migrations only (a batch table rebuild with foreign keys on would cascade deletes).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    fk = "ON" if sqlite_foreign_keys else "OFF"

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if database and database != ":memory:":
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL, much faster
            cursor.execute(f"PRAGMA foreign_keys={fk}")
        finally:
            cursor.close()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine`` (``expire_on_commit=False``, see the module docstring)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


# --- the process default ------------------------------------------------------------------

_lock = threading.Lock()
_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None


def get_engine() -> Engine:
    """The process's engine, built from ``get_settings().database_url`` on first use."""
    global _engine, _sessionmaker
    with _lock:
        if _engine is None:
            _engine = make_engine(get_settings().database_url)
            _sessionmaker = make_sessionmaker(_engine)
        return _engine


def get_sessionmaker() -> sessionmaker[Session]:
    get_engine()
    assert _sessionmaker is not None
    return _sessionmaker


def dispose_engine() -> None:
    """Forget the process engine (after a fork, or after the settings changed in tests);
    the next use builds a new one. Pooled connections are dropped without being closed,
    since after a fork they belong to the parent."""
    global _engine, _sessionmaker
    with _lock:
        if _engine is not None:
            _engine.dispose(close=False)
        _engine, _sessionmaker = None, None


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session] | None = None) -> Iterator[Session]:
    """A session that commits when the block ends normally and rolls back on an exception.

    ``factory`` defaults to the process sessionmaker. Keep blocks short: on SQLite a write
    holds the database lock until the block ends.
    """
    session = (factory or get_sessionmaker())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# --- migrations ---------------------------------------------------------------------------


def alembic_config(url: str) -> Any:
    """An Alembic ``Config`` for ``url`` that works from any working directory."""
    from alembic.config import Config

    ini = MIGRATIONS_DIR.parent / "alembic.ini"
    config = Config(str(ini)) if ini.is_file() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url  # read by migrations/env.py before Settings
    config.attributes["configure_logging"] = False  # leave the host process's logging alone
    return config


def _url_of(target: Settings | str | None) -> str:
    if target is None:
        return get_settings().database_url
    return target if isinstance(target, str) else target.database_url


def upgrade_to_head(target: Settings | str | None = None) -> None:
    """Bring the database of ``target`` (settings, URL, or the process settings) to the
    latest revision. Safe to call from every process at start: on PostgreSQL concurrent
    callers serialise on an advisory lock (migrations/env.py), on SQLite on a lock file.
    """
    from alembic import command

    url = _url_of(target)
    config = alembic_config(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        with _file_lock(Path(str(parsed.database)).expanduser().with_suffix(".migrate.lock")):
            command.upgrade(config, "head")
    else:
        command.upgrade(config, "head")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this host (a no-op where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one process per database is advised
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


__all__ = [
    "alembic_config",
    "dispose_engine",
    "get_engine",
    "get_sessionmaker",
    "make_engine",
    "make_sessionmaker",
    "session_scope",
    "upgrade_to_head",
]
