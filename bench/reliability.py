"""Reliability under worker death or a stalled run: N faults, N jobs, and count.

    python bench/reliability.py                  # N = 10 SIGKILLs of a worker node
    python bench/reliability.py --n 5 --iterations 40 --checkpoint-every 10
    python bench/reliability.py --fault stall --n 5   # SIGSTOP the run's DataLoader worker
    python bench/reliability.py --fault drain --n 5   # SIGTERM the worker (a node drain)
    python bench/reliability.py --fault drain --n 5 --iterations 40 --checkpoint-every 10 \\
        --teacher-arch deeplabv3_resnet101 --student-arch deeplabv3_resnet50  # real sizes

The cluster is the integration tests' (tests/integration/_procs.py): a uvicorn API and two
Celery workers (prefork, one child each, separate work/cache folders as separate nodes would
have) on a fresh PostgreSQL database, a private Redis and a fresh SeaweedFS S3 prefix, all
on loopback; ``scripts/services.sh up`` starts PostgreSQL/Redis/SeaweedFS if they are down.
Recovery timers are the tests' too: heartbeat every 1 s, a job is stale after 4 s without
one, a reaper pass every 1 s in each worker (production: 10 s / 120 s / 30 s).

Each round submits a tiny PCD job, waits for its first S3 checkpoint plus a random number of
further iterations (0 to ``checkpoint_every - 1``), SIGKILLs the whole process group of the
worker that owns the job (parent and child: a dead node, no cleanup), restarts that worker
at once (a node coming back), and follows the job to its end. With ``--fault stall`` the
job reads its batches through one DataLoader worker, and the round SIGSTOPs that worker
instead (the run waits for it forever: it is alive), leaving the node up: the stall
watchdog (``PCD_STALL_TIMEOUT_S``, ``--stall-timeout``) must end the run, the stopped worker
must die with it (``orphans`` counts those that did not), and the reaper must re-queue the
job. With ``--fault drain`` the round sends SIGTERM to the owning worker's main process
only (what an orchestrator sends on a drain or a rolling update), waits for that worker to
exit by itself (``drain_exit_s``), and starts it again: the job must be handed back at a
fresh checkpoint and resumed elsewhere without the reaper. ``--teacher-arch`` and
``--student-arch`` replace the tiny models by real-sized ones (default heads) at the same
32x48 crops, so checkpoints have the size of a real job's: what a drain's grace period must
cover. Per round it records:

- lost: the job did not end ``succeeded`` within ``--deadline`` (failed, or still going);
- duplicated: ``succeeded`` twice in the history, an artifact listed twice or stored in S3
  under another name set than listed, more attempts started than claims recorded, or
  checkpoints left in S3 after the end;
- resumed: attempt 2 resumed from a checkpoint at iteration > 0;
- extra iterations: the iteration the row showed at the kill minus the checkpoint iteration
  attempt 2 resumed from (work done twice). The row's iteration is written at most every
  ``PCD_PROGRESS_INTERVAL_S`` (0.2 s), so this is a lower bound by at most that much work;
- recovery times from the kill or stop (database timestamps; the database runs on this host):
  ``detect`` (the reaper re-queued it), ``reclaim`` (a worker claimed attempt 2),
  ``caught_up`` (attempt 2's row passed the iteration of the kill: the lost work is redone)
  and ``done`` (succeeded);
- with ``--fault drain``: the size of the checkpoint the job was handed back at and the
  seconds its upload took (from the job log).

Prints a table and writes ``bench/results/reliability.json`` (with the command line and the
machine's facts: cores, load, service versions).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

# the harness lives with the integration tests (tests/integration/_procs.py, _inputs.py)
from _inputs import STUDENT, TEACHER, job_spec, upload_inputs  # noqa: E402
from _procs import Cluster, db_row, db_rows, open_cluster, services_up, wait_for  # noqa: E402

from bench._common import write_json  # noqa: E402
from bench._prodfacts import command_line, load_average, machine_facts  # noqa: E402
from client.api import PcdClient  # noqa: E402
from worker.procs import argv_of, child_pids, process_alive  # noqa: E402

RESULTS = REPO / "bench" / "results" / "reliability.json"
TERMINAL = ("succeeded", "failed", "cancelled")
TIMER_SETTINGS = ("PCD_HEARTBEAT_INTERVAL_S", "PCD_HEARTBEAT_TIMEOUT_S",
                  "PCD_REAPER_INTERVAL_S", "PCD_PROGRESS_INTERVAL_S", "PCD_MAX_ATTEMPTS",
                  "PCD_REDISPATCH_AFTER_S", "PCD_STALL_TIMEOUT_S")


@dataclass
class Round:
    """What one kill did to one job (times in seconds after the kill)."""

    index: int
    job_id: str
    status: str
    attempts: int
    killed_worker: str
    killed_at_iteration: int
    checkpoint_at_kill: int
    resumed_from: int | None
    extra_iterations: int | None
    detect_s: float | None
    reclaim_s: float | None
    caught_up_s: float | None
    done_s: float | None
    lost: bool
    duplicated: bool
    duplicate_reasons: list[str]
    round_s: float
    fault: str = "kill"
    stalls_logged: int = 0  # attempts whose stacks the stall watchdog put in the job log
    drain_exit_s: float | None = None  # SIGTERM to the drained worker's exit
    orphans: int = 0  # stopped loader workers still alive after the job ended
    release_checkpoint_mb: float | None = None  # the checkpoint a drained job was handed back at
    release_upload_s: float | None = None  # and its upload's seconds


def _log(client: PcdClient, job_id: str) -> str:
    return "\n".join(line["message"] for line in client.logs(job_id)["lines"])


def _row(db: str, job_id: str, columns: str) -> tuple[Any, ...]:
    found = db_row(db, f"SELECT {columns} FROM jobs WHERE id = %s", job_id)
    if found is None:
        raise RuntimeError(f"job {job_id} has no row")
    return found


def _since(t: datetime | None, t_kill: datetime) -> float | None:
    return None if t is None else round((t - t_kill).total_seconds(), 2)


def _stored_keys(cluster: Cluster, job_id: str) -> list[str]:
    from jobs.storage import open_store

    env = cluster.env
    store = open_store(env["PCD_STORAGE_URL"], endpoint_url=env["PCD_S3_ENDPOINT_URL"],
                       access_key=env["AWS_ACCESS_KEY_ID"],
                       secret_key=env["AWS_SECRET_ACCESS_KEY"],
                       region=env["AWS_DEFAULT_REGION"])
    return sorted(info.key for info in store.list(f"jobs/{job_id}/"))


def one_round(index: int, cluster: Cluster, client: PcdClient, inputs: dict[str, str],
              args: argparse.Namespace, rng: random.Random) -> Round:
    t0 = time.monotonic()
    loaders = 1 if args.fault == "stall" else 0
    job = client.submit(job_spec(inputs, f"{args.fault}-{index}", iterations=args.iterations,
                                 checkpoint_every=args.checkpoint_every, num_workers=loaders,
                                 teacher_model=_model(args.teacher_arch, TEACHER),
                                 student_model=_model(args.student_arch, STUDENT)))
    job_id, db = job["id"], cluster.database_url
    first = wait_for(lambda: _row(db, job_id, "checkpoint_iteration")[0], 180,
                     "a first checkpoint")
    # kill somewhere between this checkpoint and the next one
    target = first + rng.randrange(0, args.checkpoint_every)
    wait_for(lambda: (_row(db, job_id, "iteration")[0] or 0) >= target, 90,
             f"iteration {target}", poll=0.05)
    (worker_id,) = _row(db, job_id, "worker_id")
    run_pid = int(str(worker_id).split(":")[1]) if worker_id else 0
    victim = cluster.owner_of(run_pid) if worker_id else None
    if victim is None:
        raise RuntimeError(f"round {index}: no live owner for worker id {worker_id}")
    stopped: list[int] = []
    if args.fault == "stall":
        stopped = _loader_workers(run_pid)
        if not stopped:
            raise RuntimeError(f"round {index}: the run (pid {run_pid}) has no loader worker")
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
    elif args.fault == "drain":
        drained = cluster.procs.pop(victim)
        os.kill(drained.pid, signal.SIGTERM)  # the main process only: Celery's warm shutdown
    else:
        cluster.signal(victim, signal.SIGKILL)
    t_kill = datetime.now(timezone.utc)
    killed_at, ckpt_at_kill = _row(db, job_id, "iteration, checkpoint_iteration")
    drain_exit_s = None
    if args.fault == "drain":
        t_term = time.monotonic()
        drained.wait(timeout=args.deadline)
        drain_exit_s = round(time.monotonic() - t_term, 2)
    if args.fault in ("kill", "drain"):
        cluster.start_worker(victim)

    caught_up: datetime | None = None

    def follow() -> bool:
        nonlocal caught_up
        # a claim restarts the row's iteration at the checkpoint (jobs.state.claim_job)
        status, attempts, phase, iteration = _row(db, job_id,
                                                  "status, attempts, phase, iteration")
        if caught_up is None and attempts >= 2 and (
                status == "succeeded" or (phase == "training" and iteration >= killed_at)):
            caught_up = datetime.now(timezone.utc)
        return status in TERMINAL

    with contextlib.suppress(AssertionError):  # past the deadline: counted as lost below
        wait_for(follow, args.deadline, f"job {job_id}", poll=0.1)
    done = client.get(job_id)
    transitions = db_rows(db, "SELECT to_status, at FROM job_transitions WHERE job_id = %s "
                              "ORDER BY id", job_id)
    after = [(s, at) for s, at in transitions if at >= t_kill]
    detect = next((at for s, at in after if s == "queued"), None)
    reclaim = next((at for s, at in after if s == "running"), None)
    finished = next((at for s, at in after if s == "succeeded"), None)

    text = _log(client, job_id)
    resumed = re.search(r"resuming from checkpoint at iteration (\d+)", text)
    resumed_from = int(resumed.group(1)) if resumed else None
    release_mb, release_s = _release_checkpoint(text)
    history = [t["to_status"] for t in done["transitions"]]
    names = [a["name"] for a in client.artifacts(job_id)]
    keys = _stored_keys(cluster, job_id)
    stored = sorted(k.rsplit("/", 1)[-1] for k in keys if "/artifacts/" in k)
    reasons = [reason for reason, bad in (
        ("succeeded twice", history.count("succeeded") > 1),
        ("artifact listed twice", len(names) != len(set(names))),
        ("S3 artifacts differ from the listing", stored != sorted(names)),
        ("uploaded twice", text.count("artifacts uploaded:") > 1),
        ("more attempts started than claimed",
         len(re.findall(r"^attempt \d+ started", text, re.M)) > history.count("running")),
        ("checkpoints left in S3", any("/checkpoints/" in k for k in keys)),
    ) if bad]
    cluster.wait_worker_ready(victim)
    orphans = [pid for pid in stopped if process_alive(pid)]
    for pid in orphans:  # counted; do not leave them to the next round
        os.kill(pid, signal.SIGKILL)
    return Round(
        index, job_id, done["status"], done["attempts"], victim, int(killed_at),
        int(ckpt_at_kill or 0), resumed_from,
        None if resumed_from is None else int(killed_at) - resumed_from,
        _since(detect, t_kill), _since(reclaim, t_kill), _since(caught_up, t_kill),
        _since(finished, t_kill), lost=done["status"] != "succeeded",
        duplicated=bool(reasons), duplicate_reasons=reasons,
        round_s=round(time.monotonic() - t0, 1), fault=args.fault,
        stalls_logged=text.count("the stall watchdog ended the run"), orphans=len(orphans),
        drain_exit_s=drain_exit_s, release_checkpoint_mb=release_mb,
        release_upload_s=release_s)


def _model(arch: str | None, tiny: dict[str, Any]) -> dict[str, Any]:
    """The harness's tiny model, or the named arch with its default (real-sized) head."""
    return {"arch": arch, "output_stride": 16} if arch else tiny


def _model_names(args: argparse.Namespace) -> str:
    return (f"{args.teacher_arch or 'tiny teacher'} -> {args.student_arch or 'tiny student'}"
            if args.teacher_arch or args.student_arch else "tiny")


def _release_checkpoint(log_text: str) -> tuple[float | None, float | None]:
    """Size (MB) and upload seconds of the checkpoint a drained job was handed back at."""
    released = re.search(r"released at iteration (\d+)", log_text)
    if not released:
        return None, None
    upload = re.search(rf"checkpoint at iteration {released.group(1)} uploaded "
                       r"\(([\d.]+) MB in ([\d.]+) s\)", log_text)
    return (float(upload.group(1)), float(upload.group(2))) if upload else (None, None)


def _loader_workers(pid: int) -> list[int]:
    """The child processes of the run ``pid`` other than its heartbeat."""
    return [c for c in child_pids(pid) if "worker.heartbeat" not in argv_of(c)]


def _stats(values: list[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(vals), 2), "max": round(max(vals), 2)}


def summarise(rounds: list[Round]) -> dict[str, Any]:
    extra = [r.extra_iterations for r in rounds if r.extra_iterations is not None]
    return {
        "rounds": len(rounds),
        "lost": sum(r.lost for r in rounds),
        "duplicated": sum(r.duplicated for r in rounds),
        "resumed": sum(r.resumed_from is not None and r.resumed_from > 0 for r in rounds),
        "extra_iterations_mean": round(statistics.fmean(extra), 2) if extra else None,
        "extra_iterations_max": max(extra) if extra else None,
        "detect_s": _stats([r.detect_s for r in rounds]),
        "reclaim_s": _stats([r.reclaim_s for r in rounds]),
        "caught_up_s": _stats([r.caught_up_s for r in rounds]),
        "done_s": _stats([r.done_s for r in rounds]),
        "stalls_logged": sum(r.stalls_logged for r in rounds),
        "drain_exit_s": _stats([r.drain_exit_s for r in rounds]),
        "release_checkpoint_mb": _stats([r.release_checkpoint_mb for r in rounds]),
        "release_upload_s": _stats([r.release_upload_s for r in rounds]),
        "orphans": sum(r.orphans for r in rounds),
    }


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def print_table(rounds: list[Round], summary: dict[str, Any], args: argparse.Namespace
                ) -> None:
    print(f"{'#':>3} {'status':<10} {'att':>3} {'killed@':>7} {'ckpt':>4} {'resumed@':>8} "
          f"{'extra':>5} {'detect':>6} {'reclaim':>7} {'caught':>6} {'done':>6} {'lost':>4} "
          f"{'dup':>3}")
    for r in rounds:
        print(f"{r.index:>3} {r.status:<10} {r.attempts:>3} {r.killed_at_iteration:>7} "
              f"{r.checkpoint_at_kill:>4} {_cell(r.resumed_from):>8} "
              f"{_cell(r.extra_iterations):>5} {_cell(r.detect_s):>6} {_cell(r.reclaim_s):>7} "
              f"{_cell(r.caught_up_s):>6} {_cell(r.done_s):>6} {int(r.lost):>4} "
              f"{int(r.duplicated):>3}")
    s = summary
    print(f"\njobs: {s['rounds']}  lost: {s['lost']}  duplicated: {s['duplicated']}  "
          f"resumed: {s['resumed']}  extra iterations per resume: mean "
          f"{s['extra_iterations_mean']}, max {s['extra_iterations_max']} "
          f"(checkpoint every {args.checkpoint_every})")
    if args.fault == "stall":
        print(f"stalls logged with their stacks: {s['stalls_logged']}  stopped loader workers "
              f"left alive: {s['orphans']}")
    if args.fault == "drain":
        print(f"drained worker exited by itself after (median / max): "
              f"{s['drain_exit_s']['median']} / {s['drain_exit_s']['max']} s; the checkpoint "
              f"it handed back: {s['release_checkpoint_mb']['median']} MB, uploaded in "
              f"{s['release_upload_s']['median']} / {s['release_upload_s']['max']} s")
    what = {"kill": "kill", "stall": "stop", "drain": "SIGTERM"}[args.fault]
    print(f"seconds after the {what} (median / max): "
          + "  ".join(f"{k[:-2]} {s[k]['median']} / {s[k]['max']}"
                      for k in ("detect_s", "reclaim_s", "caught_up_s", "done_s")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10, help="kill rounds (default 10)")
    parser.add_argument("--iterations", type=int, default=30, help="training iterations")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=180,
                        help="seconds a killed job gets to finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault", choices=("kill", "stall", "drain"), default="kill",
                        help="SIGKILL the worker node, SIGSTOP the run's loader worker, or "
                             "SIGTERM the worker (a drain)")
    parser.add_argument("--stall-timeout", type=float, default=5.0,
                        help="PCD_STALL_TIMEOUT_S of the cluster (default 5 s)")
    parser.add_argument("--teacher-arch", default=None,
                        help="a real-sized teacher (e.g. deeplabv3_resnet101) instead of the "
                             "tiny one")
    parser.add_argument("--student-arch", default=None,
                        help="a real-sized student (e.g. deeplabv3_resnet50)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/reliability.json "
                             "(reliability_<fault>.json for the other faults)")
    args = parser.parse_args(argv)
    args.out = args.out or (RESULTS if args.fault == "kill"
                            else RESULTS.with_name(f"reliability_{args.fault}.json"))
    rng = random.Random(args.seed)
    rounds: list[Round] = []
    t0 = time.monotonic()
    services = services_up()
    facts = machine_facts(services.get("PCD_DATABASE_URL"))
    with tempfile.TemporaryDirectory(prefix="pcd-reliability-") as tmp:
        root = Path(tmp)
        overrides = ({"PCD_STALL_TIMEOUT_S": str(args.stall_timeout)} if args.fault == "stall"
                     else {})
        with open_cluster(root / "cluster", services, overrides=overrides) as cluster:
            timers = {k: cluster.env.get(k) for k in TIMER_SETTINGS}
            inputs = upload_inputs(cluster, root / "inputs",
                                   teacher_model=_model(args.teacher_arch, TEACHER))
            with PcdClient(cluster.url, cluster.api_key) as client:
                for i in range(args.n):
                    rounds.append(one_round(i, cluster, client, inputs, args, rng))
                    r = rounds[-1]
                    print(f"round {i}: {r.status} attempts={r.attempts} {args.fault}@"
                          f"{r.killed_at_iteration} resumed@{r.resumed_from} "
                          f"done {r.done_s}s after the kill", flush=True)
    summary = summarise(rounds)
    print_table(rounds, summary, args)
    facts["load_average_at_end"] = load_average()
    out = write_json(args.out, {
        "command": command_line(),
        "summary": summary,
        "rounds": [asdict(r) for r in rounds],
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "timers": timers, "workers": 2,
                   "job": f"PCD {_model_names(args)}, 32x48, batch 2, cpu"
                   + (", 1 DataLoader worker" if args.fault == "stall" else "")},
        "wall_s": round(time.monotonic() - t0, 1),
        "machine": facts,
    })
    print(f"wrote {out}")
    ok = summary["lost"] == 0 and summary["duplicated"] == 0 and summary["orphans"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
