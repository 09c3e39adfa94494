"""Following a job: metric series, logs (JSON and text) and server-sent events."""

from __future__ import annotations

import threading
import time

from api_factory import Factory, auth
from fastapi.testclient import TestClient

from client.api import parse_sse


def test_metrics_series_with_name_and_step_filters(client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    job_id = factory.job(team, status="running")
    factory.metrics(job_id, [(10, "loss/ce", 1.5), (10, "loss/pcd", 0.5), (20, "loss/ce", 1.2),
                             (20, "val/miou", 0.41)])
    items = client.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()["items"]
    assert [(p["step"], p["name"], p["value"]) for p in items] == [
        (10, "loss/ce", 1.5), (10, "loss/pcd", 0.5), (20, "loss/ce", 1.2), (20, "val/miou", 0.41)]
    r = client.get(f"/jobs/{job_id}/metrics", params={"name": "loss/ce", "since_step": 15},
                   headers=auth(key))
    assert [(p["step"], p["value"]) for p in r.json()["items"]] == [(20, 1.2)]


def test_logs_json_and_text_with_since(client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    job_id = factory.job(team, status="running")
    factory.logs(job_id, ["starting", "scoring 8 batches", "iteration 10"])
    page = client.get(f"/jobs/{job_id}/logs", headers={**auth(key), "Accept":
                                                         "application/json"}).json()
    assert [ln["message"] for ln in page["lines"]] == [
        "starting", "scoring 8 batches", "iteration 10"]
    nxt = page["next_offset"]
    factory.logs(job_id, ["iteration 20"])
    more = client.get(f"/jobs/{job_id}/logs", params={"offset": nxt},
                      headers={**auth(key), "Accept": "application/json"}).json()
    assert [ln["message"] for ln in more["lines"]] == ["iteration 20"]
    text = client.get(f"/jobs/{job_id}/logs", params={"since": nxt},
                      headers={**auth(key), "Accept": "text/plain"})
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text == "iteration 20\n"
    assert int(text.headers["x-next-offset"]) == more["next_offset"]


def test_events_stream_progress_then_done(client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    job_id = factory.job(team, status="running")

    first_seen = threading.Event()

    def worker() -> None:  # what a worker would write while the client watches
        # Writes start once the client holds the first event, so a loaded machine that is
        # slow to open the stream cannot make the test miss the initial state.
        first_seen.wait(timeout=60)
        for it in (10, 20):
            time.sleep(0.15)
            factory.progress(job_id, iteration=it, max_iterations=20, phase="training")
        time.sleep(0.15)
        factory.set_status(job_id, "succeeded")

    thread = threading.Thread(target=worker)
    thread.start()
    events = []
    try:
        with client.stream("GET", f"/jobs/{job_id}/events", headers=auth(key)) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for event in parse_sse(r.iter_lines()):
                events.append(event)
                first_seen.set()
    finally:
        first_seen.set()
        thread.join()
    kinds = [e.event for e in events]
    assert kinds[-1] == "done" and events[-1].data["status"] == "succeeded"
    iterations = [e.data["progress"]["iteration"] for e in events if e.event == "progress"]
    assert iterations[0] == 0 and 20 in iterations
    assert iterations == sorted(iterations)  # one event per change, in order


def test_events_of_finished_job_end_at_once(client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    job_id = factory.job(team, status="cancelled")
    r = client.get(f"/jobs/{job_id}/events", headers=auth(key))
    assert r.text.startswith(":")  # the opening comment
    kinds = [e.event for e in parse_sse(iter(r.text.splitlines()))]
    assert kinds == ["progress", "done"]
