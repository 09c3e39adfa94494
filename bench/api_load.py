"""A bounded API load on loopback, against the real service on PostgreSQL and Redis.

    python bench/api_load.py                        # defaults below
    python bench/api_load.py --rate 200 --seconds 10 --api-workers 2 --dispatch-jobs 8

Phases, each bounded in requests *and* time (a slow machine ends a phase early, never runs
on):

1. ``POST /jobs`` at ``--post-rate`` for ``--post-seconds``: creates the jobs the GETs read
   (queued on the ``gpu`` queue, which no worker consumes during the load phases, so no
   training competes with the API for the CPU).
2. ``GET /jobs/{id}`` (random ids from phase 1) at ``--rate`` for ``--seconds``.
3. ``GET /jobs?limit=20`` at ``--rate`` for ``--seconds``.
4. Queue dispatch latency: one Celery worker (prefork, one child) on the ``cpu`` queue; for
   each of ``--dispatch-jobs`` tiny jobs, the time from the POST's response to the worker's
   claim (``started_at - created_at`` on the row, both stamped by the database clock's
   host) and to ``running`` as a poller sees it. Jobs run one after another, so this is the
   dispatch path (API -> Redis -> worker -> claim), not time spent waiting behind a job.

Open-loop pacing: request i is due at ``t0 + i / rate`` and is sent by whichever of
``--threads`` clients is free; latency is measured from the send, and ``late_ms`` reports
how far behind schedule sends were (it grows if the client machine cannot keep the rate).
Targets (issue 6): GET p99 <= 25 ms at 200 requests/s with 0 errors; dispatch median <= 1 s.
The load generator runs on the same machine as the API, PostgreSQL and Redis and competes
with them for the cores. Writes ``bench/results/api_load.json`` with the command line and the
machine's facts (cores, load average, the busiest processes, service versions).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

# the harness lives with the integration tests (tests/integration/_procs.py, _inputs.py)
from _inputs import job_spec, upload_inputs  # noqa: E402
from _procs import Cluster, db_row, open_cluster, services_up, wait_for  # noqa: E402

from bench._common import write_json  # noqa: E402
from bench._prodfacts import command_line, load_average, machine_facts  # noqa: E402

RESULTS = REPO / "bench" / "results" / "api_load.json"


@dataclass
class PhaseResult:
    """Latencies (ms) and outcome counts of one phase."""

    name: str
    target_rate: float
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    late_ms: list[float] = field(default_factory=list, repr=False)
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

        return {
            "phase": self.name, "target_rps": self.target_rate, "requests": self.sent,
            "errors": self.errors, "throughput_rps": round(self.sent / self.seconds, 1)
            if self.seconds else 0.0,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": round(lat[-1], 2) if lat else None,
            "late_p99_ms": round(sorted(self.late_ms)[int(0.99 * (len(self.late_ms) - 1))], 2)
            if self.late_ms else None,
            "error_samples": self.error_samples[:5],
        }


def paced(name: str, url: str, key: str, rate: float, seconds: float, threads: int,
          request: Callable[[httpx.Client, int], httpx.Response],
          ok: Callable[[httpx.Response], bool]) -> PhaseResult:
    """Send ``rate * seconds`` requests on schedule (open loop); stop at ``seconds * 2``."""
    total = int(rate * seconds)
    result = PhaseResult(name, rate)
    lock = threading.Lock()
    counter = iter(range(total))
    t0 = time.perf_counter() + 0.2
    hard_stop = t0 + seconds * 2 + 5

    def loop() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None or time.perf_counter() > hard_stop:
                    return
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                start = time.perf_counter()
                try:
                    response = request(http, i)
                    good, detail = ok(response), f"{response.status_code} {response.text[:100]}"
                except httpx.HTTPError as exc:
                    good, detail = False, repr(exc)
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    result.sent += 1
                    result.late_ms.append(max(0.0, (start - due) * 1000))
                    if good:
                        result.latencies_ms.append(elapsed)
                    else:
                        result.errors += 1
                        result.error_samples.append(detail)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result.seconds = time.perf_counter() - t0
    return result


def _no_teacher(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain cross-entropy, no teacher: the cheapest job (its training is not measured)."""
    spec = {**spec, "method": {"name": "none"}}
    spec.pop("teacher", None)
    return spec


def dispatch_latency(cluster: Cluster, inputs: dict[str, str], n: int,
                     gap_s: float) -> dict[str, Any]:
    """POST -> claim (row timestamps) and POST -> ``running`` seen by a 20 ms poller.

    Each POST waits ``gap_s`` after the previous job ended: with ``max_tasks_per_child=1``
    the worker replaces its pool child after every job, and a job posted during that
    replacement measures the respawn, not the dispatch path.
    """
    cluster.start_worker("dispatch", queues="cpu")
    cluster.wait_worker_ready("dispatch")
    headers = {"Authorization": f"Bearer {cluster.api_key}"}
    claims, seen = [], []
    spec = _no_teacher(job_spec(inputs, "dispatch", iterations=1))
    with httpx.Client(base_url=cluster.url, headers=headers, timeout=30) as http:
        for _ in range(n):
            job = http.post("/jobs", json=spec).raise_for_status().json()
            t_resp = time.perf_counter()

            def status(job_id: str = job["id"]) -> str:
                return str(http.get(f"/jobs/{job_id}").json()["status"])

            wait_for(lambda: status() != "queued", 60, "the claim", poll=0.02)
            seen.append(time.perf_counter() - t_resp)
            created, started = db_row(cluster.database_url, "SELECT created_at, started_at "
                                      "FROM jobs WHERE id = %s", job["id"]) or (None, None)
            if created is not None and started is not None:
                claims.append((started - created).total_seconds())
            wait_for(lambda: status() in ("succeeded", "failed", "cancelled"), 180,
                     "the job to end (the next one must find the worker idle)", poll=0.5)
            time.sleep(gap_s)
    return {
        "jobs": n, "gap_s": gap_s,
        "claim_s_median": round(statistics.median(claims), 3) if claims else None,
        "claim_s_max": round(max(claims), 3) if claims else None,
        "running_seen_s_median": round(statistics.median(seen), 3) if seen else None,
        "running_seen_s_max": round(max(seen), 3) if seen else None,
        "claims_s": [round(c, 3) for c in claims],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="GET requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per GET phase")
    parser.add_argument("--post-rate", type=float, default=20.0)
    parser.add_argument("--post-seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--stock-uvicorn-workers", action="store_true",
                        help="plain `uvicorn --workers N` (loses TCP_NODELAY, uvicorn #3149)")
    parser.add_argument("--dispatch-jobs", type=int, default=8)
    parser.add_argument("--dispatch-gap", type=float, default=5.0,
                        help="seconds between a job's end and the next POST (idle worker)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    phases: list[PhaseResult] = []
    t0 = time.monotonic()
    services = services_up()
    facts = machine_facts(services.get("PCD_DATABASE_URL"))
    with tempfile.TemporaryDirectory(prefix="pcd-api-load-") as tmp:
        root = Path(tmp)
        # The hundreds of jobs of phase 1 stay queued on purpose: keep the dispatch worker's
        # reaper from re-sending all of them while phase 4 measures the dispatch path.
        with open_cluster(root / "cluster", services, workers=(),
                          api_workers=args.api_workers,
                          stock_uvicorn=args.stock_uvicorn_workers,
                          overrides={"PCD_REDISPATCH_AFTER_S": "3600"}) as cluster:
            inputs = upload_inputs(cluster, root / "inputs", teacher=False)
            load_spec = _no_teacher(job_spec(inputs, "load"))
            load_spec["resources"] = {"gpus": 1, "queue": "gpu"}  # nobody consumes it here
            ids: list[str] = []

            def post(http: httpx.Client, _: int) -> httpx.Response:
                r = http.post("/jobs", json=load_spec)
                if r.status_code == 201:
                    ids.append(r.json()["id"])
                return r

            phases.append(paced("POST /jobs", cluster.url, cluster.api_key, args.post_rate,
                                args.post_seconds, args.threads, post,
                                lambda r: r.status_code == 201))
            if not ids:
                raise SystemExit("no job was created; see the logs above")
            phases.append(paced(
                "GET /jobs/{id}", cluster.url, cluster.api_key, args.rate, args.seconds,
                args.threads, lambda http, _: http.get(f"/jobs/{rng.choice(ids)}"),
                lambda r: r.status_code == 200))
            phases.append(paced(
                "GET /jobs", cluster.url, cluster.api_key, args.rate, args.seconds,
                args.threads, lambda http, _: http.get("/jobs", params={"limit": 20}),
                lambda r: r.status_code == 200))
            dispatch = dispatch_latency(cluster, inputs, args.dispatch_jobs,
                                        args.dispatch_gap)
    summaries = [p.summary() for p in phases]
    print(f"{'phase':<16} {'target/s':>8} {'req':>5} {'err':>4} {'rps':>7} {'p50 ms':>7} "
          f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'late p99':>8}")
    for s in summaries:
        print(f"{s['phase']:<16} {s['target_rps']:>8.0f} {s['requests']:>5} {s['errors']:>4} "
              f"{s['throughput_rps']:>7.1f} {s['p50_ms']!s:>7} {s['p90_ms']!s:>7} "
              f"{s['p99_ms']!s:>7} {s['max_ms']!s:>7} {s['late_p99_ms']!s:>8}")
        for sample in s["error_samples"]:
            print(f"    error: {sample}")
    print(f"dispatch (POST -> claim, {dispatch['jobs']} jobs): median "
          f"{dispatch['claim_s_median']} s, max {dispatch['claim_s_max']} s; POST -> running "
          f"seen by a poller: median {dispatch['running_seen_s_median']} s")
    facts["load_average_at_end"] = load_average()
    out = write_json(args.out, {
        "command": command_line(),
        "phases": summaries, "dispatch": dispatch,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": round(time.monotonic() - t0, 1),
        "machine": facts,
    })
    print(f"wrote {out}")
    gets = [s for s in summaries if s["phase"].startswith("GET")]
    met = all(s["errors"] == 0 and (s["p99_ms"] or 1e9) <= 25 for s in gets) and \
        (dispatch["claim_s_median"] or 1e9) <= 1.0
    print("targets met" if met else "targets NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
