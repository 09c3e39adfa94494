"""Live job progress for ``pcd submit --watch`` / ``pcd watch``: a rich progress bar.

Why SSE with a polling fallback: SSE gives sub-second updates without hammering the API, but
proxies and load balancers sometimes buffer or cut event streams; when the stream fails (or
ends before the job does) we fall back to polling ``GET /jobs/{id}`` so a watch never hangs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
)

from client.api import TERMINAL_STATUSES, PcdClient, PcdError

POLL_S = 2.0


def _progress_of(job: Mapping[str, Any]) -> Mapping[str, Any]:
    """Progress fields, whether nested under ``progress`` or flat on the job."""
    nested = job.get("progress")
    return nested if isinstance(nested, Mapping) else job


def _fmt_eta(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60:02d}:{s % 60:02d}"


def describe(job: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the bar shows, from a job (or an SSE progress event)."""
    prog = _progress_of(job)
    losses = prog.get("losses") or job.get("losses") or {}
    metrics = job.get("metrics") or prog.get("metrics") or job.get("latest_metrics") or {}
    miou = metrics.get("miou") if isinstance(metrics, Mapping) else None
    ips = prog.get("images_per_s")
    loss_txt = " ".join(f"{k}={float(v):.3f}" for k, v in losses.items()
                        if isinstance(v, (int, float)))
    return {
        "status": job.get("status", ""),
        "phase": prog.get("phase") or job.get("phase") or "",
        "iteration": int(prog.get("iteration") or 0),
        "max_iterations": int(prog.get("max_iterations") or 0) or None,
        "eta": _fmt_eta(prog.get("eta_s")),
        "ips": f"{ips:.1f} img/s" if isinstance(ips, (int, float)) else "",
        "losses": loss_txt,
        "miou": f"mIoU {miou:.3f}" if isinstance(miou, (int, float)) else "",
    }


class JobBar:
    """A one-line rich progress bar bound to one job."""

    def __init__(self, console: Console, job_id: str) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[status]}[/] {task.fields[phase]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[ips]}"),
            TextColumn("{task.fields[losses]}"),
            TextColumn("[green]{task.fields[miou]}"),
            console=console,
            transient=False,
        )
        self.task: TaskID = self.progress.add_task(
            job_id, total=None, status="", phase="", eta="--:--", ips="", losses="", miou="")
        self._miou = ""

    def update(self, job: Mapping[str, Any]) -> None:
        d = describe(job)
        if d["miou"]:
            self._miou = d["miou"]  # keep the last eval visible between evaluations
        self.progress.update(
            self.task, completed=d["iteration"], total=d["max_iterations"],
            status=d["status"], phase=d["phase"], eta=d["eta"], ips=d["ips"],
            losses=d["losses"], miou=self._miou)


def _merge(job: dict[str, Any], payload: Any) -> dict[str, Any]:
    """Fold an SSE event's payload into our view of the job (events may be partial)."""
    if isinstance(payload, Mapping):
        job = {**job, **payload}
        if isinstance(payload.get("progress"), Mapping) and isinstance(
                job.get("progress"), Mapping):
            job["progress"] = {**job.get("progress", {}), **payload["progress"]}
    return job


def watch_job(client: PcdClient, job_id: str, console: Console | None = None,
              use_sse: bool = True) -> dict[str, Any]:
    """Show live progress until the job is terminal; returns the final job."""
    console = console or Console()
    bar = JobBar(console, job_id)
    job = client.get(job_id)
    with bar.progress:
        bar.update(job)
        if use_sse and job.get("status") not in TERMINAL_STATUSES:
            try:
                for event in client.events(job_id):
                    job = _merge(job, event.data)
                    bar.update(job)
                    if job.get("status") in TERMINAL_STATUSES:
                        break
            except (httpx.HTTPError, PcdError):
                pass  # fall back to polling below
        while True:
            job = client.get(job_id)
            bar.update(job)
            if job.get("status") in TERMINAL_STATUSES:
                return job
            time.sleep(POLL_S)
