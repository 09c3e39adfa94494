"""Alembic environment: the URL comes from ``jobs.settings`` (or from ``jobs.db.upgrade_to_head``
through ``config.attributes["database_url"]``), never from alembic.ini, so migrations always
hit the database the service uses.

- SQLite: ``render_as_batch=True`` (SQLite cannot ALTER most things; batch mode rebuilds the
  table) and foreign keys OFF while migrating, so a rebuild cannot cascade deletes.
- PostgreSQL: the whole upgrade runs in one transaction holding an advisory lock, so API and
  workers starting together migrate once, one after the other.
"""

from __future__ import annotations

import logging
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text

from jobs.db import make_engine
from jobs.models import Base
from jobs.settings import get_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
log = logging.getLogger("alembic.env")

target_metadata = Base.metadata
# Any constant: the advisory lock that serialises concurrent migrations on PostgreSQL.
PG_MIGRATION_LOCK = 0x70CD_0001


def _url() -> str:
    return str(config.attributes.get("database_url") or get_settings().database_url)


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: emit SQL instead of running it."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    engine = make_engine(url, sqlite_foreign_keys=False)
    try:
        with engine.connect() as connection:
            is_sqlite = connection.dialect.name == "sqlite"
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=is_sqlite,
                compare_type=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK}
                    )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
