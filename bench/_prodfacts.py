"""What the production-mode bench scripts (reliability.py, api_load.py) record beside their
numbers: the exact command, the machine, how loaded it was, and the service versions.

No torch here: ``api_load.py`` measures the API, which never imports it. A run on a shared,
noisy machine is only comparable with another run whose facts say the same.
"""

from __future__ import annotations

import functools
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """The command as typed from the repository root: ``python bench/x.py --flag v``."""
    script = Path(sys.argv[0]).resolve()
    try:
        first = str(script.relative_to(REPO))
    except ValueError:
        first = sys.argv[0]
    return shlex.join(["python", first, *sys.argv[1:]])


def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False,
                             cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip() if text else None


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once: the bench looks up its records by CPU run after run."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def cpu_signature(cpuinfo: str | None = None) -> str | None:
    """x86 family/model/stepping from /proc/cpuinfo, e.g. "family 25 model 17 stepping 1".

    A virtual machine's model name can be as vague as "AMD EPYC" across CPU generations
    whose float results differ (bench/README.md), so CPU-reproducibility claims need this
    too. None where the fields are missing (not x86 Linux)."""
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip() and fields:
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        if key.strip() in ("cpu family", "model", "stepping"):
            fields.setdefault(key.strip(), value.strip())
    if len(fields) < 3:
        return None
    return f"family {fields['cpu family']} model {fields['model']} stepping {fields['stepping']}"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busiest_processes(n: int = 3) -> list[str]:
    """The ``n`` processes with the most CPU (``ps``, lifetime average): what else ran."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu", "--no-headers"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [" ".join(line.split())[:120] for line in out.splitlines() if line.strip()][:n]


def machine_facts(database_url: str | None = None) -> dict[str, Any]:
    """Host, cores, CPU, memory, load, Python and the service versions, at call time."""
    facts: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_signature": cpu_signature(),
        "mem_total_gib": _mem_total_gib(),
        "load_average_1_5_15": load_average(),
        "busiest_processes": busiest_processes(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis": _first_line(["redis-server", "--version"]),
        "seaweedfs": _first_line([str(REPO / ".venv" / "bin" / "weed"), "version"]),
        "git_commit": _first_line(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_first_line(["git", "status", "--porcelain"])),
    }
    if database_url:
        try:
            import psycopg

            url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
            with psycopg.connect(url, connect_timeout=5) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                facts["postgresql"] = row[0] if row else None
        except Exception as exc:  # facts are best effort; the numbers are what matters
            facts["postgresql"] = f"unknown ({type(exc).__name__})"
    return facts


__all__ = ["busiest_processes", "command_line", "load_average", "machine_facts"]
