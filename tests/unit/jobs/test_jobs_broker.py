"""``jobs.broker``: the one place where the API and the worker resolve the broker."""

from __future__ import annotations

import typing
from pathlib import Path

from jobs import broker
from jobs.settings import Settings
from jobs.spec import ResourcesSpec


def test_queues_are_the_spec_queues() -> None:
    literal = ResourcesSpec.model_fields["queue"].annotation
    assert set(typing.get_args(literal)) == set(broker.QUEUES)
    assert broker.DEFAULT_QUEUE in broker.QUEUES and broker.TASK_RUN_JOB == "pcd.run_job"


def test_job_queue_is_a_direct_exchange_of_the_same_name() -> None:
    q = broker.job_queue("cpu")
    assert (q.name, q.routing_key, q.exchange.name, q.exchange.type) == ("cpu", "cpu", "cpu",
                                                                         "direct")
    assert [q.name for q in broker.job_queues()] == list(broker.QUEUES)


def test_filesystem_url_names_the_folder_or_defaults_to_work_dir(tmp_path: Path) -> None:
    assert broker.filesystem_broker_folder(f"filesystem://{tmp_path}/b", "/x") == tmp_path / "b"
    assert broker.filesystem_broker_folder("filesystem://", tmp_path / "w") == (
        tmp_path / "w" / "broker")


def test_filesystem_connection_args_create_absolute_shared_folders(tmp_path: Path) -> None:
    url, options = broker.connection_args(f"filesystem://{tmp_path / 'b'}", tmp_path, 120)
    assert url == "filesystem://"
    assert options["visibility_timeout"] == 120 and options["store_processed"] is False
    assert options["data_folder_in"] == options["data_folder_out"] == str(tmp_path / "b/queue")
    for key, sub in (("processed_folder", "processed"), ("control_folder", "control")):
        assert options[key] == str(tmp_path / "b" / sub) and Path(options[key]).is_dir()


def test_other_urls_pass_through(tmp_path: Path) -> None:
    assert broker.connection_args("redis://r:6379/0", tmp_path) == ("redis://r:6379/0", {})
    settings = Settings(broker_url="redis://r:6379/0", visibility_timeout_s=7200)
    assert broker.broker_args(settings) == ("redis://r:6379/0", {"visibility_timeout": 7200})
