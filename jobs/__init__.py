"""The domain shared by the API and the worker: settings, the job spec, the database schema,
the job state machine and the operations on jobs.

Modules (import them explicitly; this package imports nothing eagerly, so ``jobs.settings``
stays cheap and no module here ever loads torch):

- ``jobs.settings``  one ``Settings`` (env prefix ``PCD_``) for API, worker and Alembic.
- ``jobs.spec``      ``JobSpec``: ``pcd_core.spec.RunSpec`` plus service-only fields.
- ``jobs.db``        engines, sessions, ``session_scope()``, ``upgrade_to_head()``.
- ``jobs.models``    SQLAlchemy tables (created only by ``migrations/``).
- ``jobs.state``     the job state machine: ``transition()``, ``claim_job()``.
- ``jobs.service``   what routes and tasks call (create/list/cancel jobs, progress, reaper).
- ``jobs.errors``    the stable error codes a failed job carries.
- ``jobs.storage``   object storage backends.
"""
