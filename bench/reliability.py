"""Reliability under worker death: SIGKILL the worker running a job, N times, and count.

    python bench/reliability.py            # N = 20
    python bench/reliability.py --n 5 --iterations 60 --checkpoint-every 10

The cluster is the integration tests' (tests/integration/_procs.py): a uvicorn API and two
Celery workers (prefork, one child each, separate work/cache folders as separate nodes would
have) on a fresh PostgreSQL database, a private Redis and a fresh SeaweedFS S3 prefix, all
on loopback; ``scripts/services.sh up`` starts PostgreSQL/SeaweedFS if they are down.

Each round submits a tiny PCD job, waits for its first S3 checkpoint plus a random number of
further iterations, SIGKILLs the whole process group of the worker that owns the job
(parent and child: a dead node), restarts that worker, and waits for the job to end. Per
round it records:

- lost: the job did not end ``succeeded`` within the deadline;
- duplicated: ``succeeded`` twice in its history, an artifact recorded or uploaded twice,
  or more attempts started than claims recorded;
- resumed: attempt 2 resumed from a checkpoint at iteration > 0;
- extra iterations: the iteration the row showed at the kill minus the checkpoint iteration
  attempt 2 resumed from (work done twice). The row's iteration is written at most every
  ``PCD_PROGRESS_INTERVAL_S`` (0.2 s), so this is a lower bound by at most that much work.

Prints a table and writes ``bench/results/reliability.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

# the harness lives with the integration tests (tests/integration/_procs.py, _inputs.py)
from _inputs import job_spec, upload_inputs  # noqa: E402
from _procs import Cluster, db_row, open_cluster, services_up, wait_for  # noqa: E402

from client.api import PcdClient  # noqa: E402

RESULTS = REPO / "bench" / "results" / "reliability.json"


@dataclass
class Round:
    """What one kill did to one job."""

    index: int
    job_id: str
    status: str
    attempts: int
    killed_worker: str
    killed_at_iteration: int
    resumed_from: int | None
    extra_iterations: int | None
    lost: bool
    duplicated: bool
    seconds: float


def _log(client: PcdClient, job_id: str) -> str:
    return "\n".join(line["message"] for line in client.logs(job_id)["lines"])


def one_round(index: int, cluster: Cluster, client: PcdClient, inputs: dict[str, str],
              args: argparse.Namespace, rng: random.Random) -> Round:
    t0 = time.monotonic()
    job = client.submit(job_spec(inputs, f"kill-{index}", iterations=args.iterations,
                                 checkpoint_every=args.checkpoint_every))
    job_id, db = job["id"], cluster.database_url
    first = wait_for(lambda: (db_row(db, "SELECT checkpoint_iteration FROM jobs WHERE id = %s",
                                     job_id) or (None,))[0], 180, "a first checkpoint")
    # kill somewhere between this checkpoint and the next one
    target = first + rng.randrange(0, args.checkpoint_every)
    wait_for(lambda: (db_row(db, "SELECT iteration FROM jobs WHERE id = %s", job_id)
                      or (0,))[0] >= target, 60, f"iteration {target}", poll=0.05)
    worker_id, killed_at = db_row(db, "SELECT worker_id, iteration FROM jobs WHERE id = %s",
                                  job_id) or (None, 0)
    victim = cluster.owner_of(int(str(worker_id).split(":")[1])) if worker_id else None
    if victim is None:
        raise RuntimeError(f"round {index}: no live owner for worker id {worker_id}")
    cluster.signal(victim, signal.SIGKILL)
    cluster.start_worker(victim)
    try:
        done = wait_for(lambda: _terminal(client, job_id), args.deadline, f"job {job_id}")
    except AssertionError:
        done = client.get(job_id)
    text = _log(client, job_id)
    resumed = re.search(r"resuming from checkpoint at iteration (\d+)", text)
    resumed_from = int(resumed.group(1)) if resumed else None
    history = [t["to_status"] for t in done["transitions"]]
    names = [a["name"] for a in client.artifacts(job_id)]
    duplicated = (history.count("succeeded") > 1 or len(names) != len(set(names))
                  or text.count("artifacts uploaded:") > 1
                  or len(re.findall(r"^attempt \d+ started", text, re.M))
                  > history.count("running"))
    cluster.wait_worker_ready(victim)
    return Round(index, job_id, done["status"], done["attempts"], victim, int(killed_at),
                 resumed_from, None if resumed_from is None else int(killed_at) - resumed_from,
                 lost=done["status"] != "succeeded", duplicated=duplicated,
                 seconds=round(time.monotonic() - t0, 1))


def _terminal(client: PcdClient, job_id: str) -> dict[str, Any] | None:
    job = client.get(job_id)
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def summarise(rounds: list[Round]) -> dict[str, Any]:
    extra = [r.extra_iterations for r in rounds if r.extra_iterations is not None]
    return {
        "rounds": len(rounds),
        "lost": sum(r.lost for r in rounds),
        "duplicated": sum(r.duplicated for r in rounds),
        "resumed": sum(r.resumed_from is not None and r.resumed_from > 0 for r in rounds),
        "extra_iterations_mean": round(statistics.fmean(extra), 2) if extra else None,
        "extra_iterations_max": max(extra) if extra else None,
        "recovery_seconds_median": statistics.median(r.seconds for r in rounds)
        if rounds else None,
    }


def print_table(rounds: list[Round], summary: dict[str, Any]) -> None:
    print(f"{'#':>3} {'status':<10} {'att':>3} {'killed@':>7} {'resumed@':>8} {'extra':>5} "
          f"{'lost':>4} {'dup':>3} {'s':>6}")
    for r in rounds:
        print(f"{r.index:>3} {r.status:<10} {r.attempts:>3} {r.killed_at_iteration:>7} "
              f"{r.resumed_from if r.resumed_from is not None else '-':>8} "
              f"{r.extra_iterations if r.extra_iterations is not None else '-':>5} "
              f"{int(r.lost):>4} {int(r.duplicated):>3} {r.seconds:>6.1f}")
    print(f"\njobs: {summary['rounds']}  lost: {summary['lost']}  duplicated: "
          f"{summary['duplicated']}  resumed: {summary['resumed']}  extra iterations per "
          f"resume: mean {summary['extra_iterations_mean']}, max "
          f"{summary['extra_iterations_max']}  (checkpoint every {ARGS.checkpoint_every})")


ARGS = argparse.Namespace()


def main(argv: list[str] | None = None) -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="kill rounds (default 20)")
    parser.add_argument("--iterations", type=int, default=40, help="training iterations")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=180,
                        help="seconds a killed job gets to finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    ARGS = args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="pcd-reliability-") as tmp:
        root = Path(tmp)
        with open_cluster(root / "cluster", services_up()) as cluster:
            inputs = upload_inputs(cluster, root / "inputs")
            with PcdClient(cluster.url, cluster.api_key) as client:
                for i in range(args.n):
                    rounds.append(one_round(i, cluster, client, inputs, args, rng))
                    r = rounds[-1]
                    print(f"round {i}: {r.status} attempts={r.attempts} killed@"
                          f"{r.killed_at_iteration} resumed@{r.resumed_from}", flush=True)
    summary = summarise(rounds)
    print_table(rounds, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "summary": summary, "rounds": [asdict(r) for r in rounds],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"host": platform.node(), "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
    }, indent=2))
    print(f"wrote {args.out}")
    return 0 if summary["lost"] == 0 and summary["duplicated"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
