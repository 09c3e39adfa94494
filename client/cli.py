"""``pcd``: the command line of the PCD distillation service (typer + rich).

Configured by ``PCD_API_URL`` (default http://127.0.0.1:8000) and ``PCD_API_KEY``. Every
command except ``serve`` and ``keys create`` talks HTTP only. Those two are the bootstrap of
the embedded default and reach the service's code lazily (subprocesses, or an import inside
the command), so importing this module never pulls in the server side or torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Column, Table

from client.api import TERMINAL_STATUSES, ChecksumError, PcdClient, PcdError

app = typer.Typer(no_args_is_help=True, help="PCD distillation service: submit, watch, fetch.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (bootstrap; direct DB access).")
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True)


def _client() -> PcdClient:
    return PcdClient(os.environ.get("PCD_API_URL"), os.environ.get("PCD_API_KEY"))


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def _call(fn: Any, *args: Any, **kw: Any) -> Any:
    """Run a client call, turning HTTP/transport errors into a one-line message + exit 1."""
    import httpx

    try:
        return fn(*args, **kw)
    except PcdError as exc:
        raise _fail(str(exc)) from None
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the service: {exc}") from None


def _print_job(job: dict[str, Any]) -> None:
    nested = job.get("progress")
    prog: dict[str, Any] = nested if isinstance(nested, dict) else job
    table = Table(show_header=False, box=None)
    for key in ("id", "name", "status", "phase", "attempts", "created_at", "started_at",
                "finished_at"):
        if job.get(key) is not None:
            table.add_row(key, str(job[key]))
    if prog.get("max_iterations"):
        table.add_row("iteration", f"{prog.get('iteration', 0)}/{prog['max_iterations']}")
    for key in ("images_per_s", "eta_s", "losses", "metrics"):
        value = prog.get(key, job.get(key))
        if value not in (None, {}, ""):
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    error = job.get("error")
    if isinstance(error, dict):
        table.add_row("[red]error", f"{error.get('code')}: {error.get('message')}")
    elif error:
        table.add_row("[red]error", str(error))
    console.print(table)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="API bind address."),
    port: int = typer.Option(8000, help="API port."),
    pool: str = typer.Option("prefork", help="Celery pool: prefork (a fresh child per job) "
                             "or solo."),
    concurrency: int = typer.Option(1, help="Jobs run at once by the embedded worker."),
    worker: bool = typer.Option(True, help="Start the embedded worker (--no-worker: API "
                                "and reaper only, workers run elsewhere)."),
    reaper_interval: float = typer.Option(15.0, help="Seconds between reaper passes."),
) -> None:
    """Run the service on this machine: migrations, API, one worker, the reaper.

    Ctrl-C stops it; a running job is checkpointed and handed back first (up to a minute),
    and the next ``pcd serve`` resumes it. Ctrl-C again stops at once.
    """
    from client import serve as sv

    env = dict(os.environ)
    cwd = Path.cwd()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), env.get("PYTHONPATH")) if p)
    sv.run_migrations(env, cwd)
    children = sv.commands(host=host, port=port, pool=pool, concurrency=concurrency,
                           reaper_interval_s=reaper_interval, with_worker=worker)
    console.print(f"[bold]pcd serve[/]: API on http://{host}:{port}  (Ctrl-C to stop)")
    raise typer.Exit(sv.supervise(children, env, cwd, log=lambda m: err.print(f"[dim]{m}")))


@keys_app.command("create")
def keys_create(
    team: str = typer.Option(..., "--team", help="Team the key acts for (created if new)."),
    name: str = typer.Option("cli", help="A label for the key."),
) -> None:
    """Create an API key with direct database access (keys bootstrap before any key exists).

    Runs the server side's ``python -m jobs.admin create-key`` in a child process, as
    ``pcd serve`` runs the API: the client package itself never imports the server packages.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.admin", "create-key", "--team", team, "--name", name],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise _fail(f"could not create a key:\n{proc.stderr.strip()}")
    secret = proc.stdout.strip().splitlines()[-1]
    # stdout carries the bare key (scriptable: KEY=$(pcd keys create --team t)); the hint goes
    # to stderr. It is shown once: only its hash is stored.
    err.print(f"API key for team {team!r} (shown once; store it now):")
    print(secret)
    err.print(f"export PCD_API_KEY={secret}", soft_wrap=True)


def _load_spec(path: Path, overrides: list[str]) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise _fail(f"{path} is not a mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise _fail(f"--set expects key=value, got {item!r}")
        node = spec
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return spec


@app.command()
def submit(
    spec_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec YAML/JSON."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Show live progress until done."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: train.iterations=200."),
    idempotency_key: str = typer.Option(None, help="Retry-safe submit: same key, same job."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the job id."),
) -> None:
    """Submit a job; prints its id (``--watch`` follows it to the end)."""
    spec = _load_spec(spec_path, set_)
    with _client() as client:
        job = _call(client.submit, spec, idempotency_key=idempotency_key)
        if quiet:
            print(job["id"], flush=True)
        else:
            console.print(f"submitted [bold]{job['id']}[/] ({job.get('status')})")
        if watch:
            _watch(client, job["id"])


def _watch(client: PcdClient, job_id: str) -> None:
    from client.watch import watch_job

    try:
        job = _call(watch_job, client, job_id, console)
    except KeyboardInterrupt:
        err.print(f"stopped watching; the job continues (pcd cancel {job_id} to stop it)")
        raise typer.Exit(130) from None
    _print_job(job)
    if job.get("status") != "succeeded":
        raise typer.Exit(1)


@app.command("watch")
def watch_cmd(job_id: str) -> None:
    """Follow a job's progress until it ends."""
    with _client() as client:
        _watch(client, job_id)


@app.command()
def status(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one job: status, phase, progress, ETA, metrics, error."""
    with _client() as client:
        job = _call(client.get, job_id)
    if as_json:
        console.print_json(data=job)
    else:
        _print_job(job)


@app.command("list")
def list_cmd(
    status: str = typer.Option(None, help="Only jobs in this status."),
    limit: int = typer.Option(20, help="At most this many jobs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the ids, one per line."),
) -> None:
    """List the team's jobs, newest first."""
    with _client() as client:
        page = _call(client.list, status=status, limit=limit)
    if quiet:
        for job in page.get("items", []):
            print(job["id"])
        return
    table = Table("name", "status", "phase", "progress", "created")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=32))  # ids are for copying
    for job in page.get("items", []):
        prog = job.get("progress") if isinstance(job.get("progress"), dict) else job
        it, mx = prog.get("iteration"), prog.get("max_iterations")
        table.add_row(str(job.get("id")), str(job.get("name", "")), str(job.get("status")),
                      str(job.get("phase") or prog.get("phase") or ""),
                      f"{it or 0}/{mx}" if mx else "", str(job.get("created_at", "")))
    console.print(table)


@app.command()
def logs(job_id: str, follow: bool = typer.Option(False, "--follow", "-f")) -> None:
    """Print the run's log (``-f`` keeps printing until the job ends)."""
    offset = 0
    with _client() as client:
        while True:
            body = _call(client.logs, job_id, offset=offset)
            for line in body.get("lines", []):
                text = line if isinstance(line, str) else \
                    f"{line.get('at', '')} {line.get('level', '')} {line.get('message', line)}"
                sys.stdout.write(text.rstrip("\n") + "\n")
            sys.stdout.flush()
            offset = int(body.get("next_offset", offset))
            if not follow:
                return
            if _call(client.get, job_id).get("status") in TERMINAL_STATUSES:
                if not body.get("lines"):
                    return
                continue  # drain what was written before the end
            time.sleep(1.0)


@app.command()
def cancel(job_id: str) -> None:
    """Request cancellation (cooperative; the job ends ``cancelled``)."""
    with _client() as client:
        job = _call(client.cancel, job_id)
    console.print(f"{job_id}: {job.get('status')}")


@app.command()
def fetch(job_id: str, out: Path = typer.Option(..., "--out", "-o", help="Directory.")) -> None:
    """Download every artifact of a job into ``--out``, verifying each sha256."""
    out.mkdir(parents=True, exist_ok=True)
    with _client() as client:
        artifacts = _call(client.artifacts, job_id)
        if not artifacts:
            raise _fail(f"job {job_id} has no artifacts")
        for art in artifacts:
            try:
                path = _call(client.download, job_id, art["name"], out, sha256=art.get("sha256"))
            except ChecksumError as exc:
                raise _fail(str(exc)) from None
            console.print(f"[green]ok[/] {path} ({art.get('size', '?')} bytes, sha256 verified)")


@app.command()
def upload(
    path: Path = typer.Argument(..., exists=True, help="A file, or a directory (tarred)."),
    kind: str = typer.Option(..., "--kind", help="dataset | checkpoint"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the URI."),
) -> None:
    """Upload a dataset (archive or directory) or a teacher checkpoint; prints its URI."""
    if kind not in ("dataset", "checkpoint"):
        raise _fail("--kind must be dataset or checkpoint")
    with _client() as client:
        if path.is_dir():
            # Tar on the fly into a temporary file (not memory): datasets can be gigabytes.
            with tempfile.TemporaryFile() as tmp:
                with tarfile.open(fileobj=tmp, mode="w") as tar:
                    tar.add(path, arcname=".")
                tmp.seek(0)
                result = _call(client.upload_stream, tmp, kind, filename=f"{path.name}.tar")
        else:
            result = _call(client.upload, path, kind)
    if quiet:
        print(result["uri"])
        return
    console.print(f"uploaded: [bold]{result.get('uri') or result.get('id')}[/]")
    console.print_json(data=result)


if __name__ == "__main__":
    app()
