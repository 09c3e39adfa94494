"""The PCD worker: the Celery app, the job runner, the reaper.

``worker -> jobs + pcd_core`` (DESIGN.md). The Celery task is a thin shell around
:func:`worker.runner.execute_job`, a plain function that tests call without a broker.
"""
