"""The dependency arrows of DESIGN.md, held by tests rather than by good intentions.

api -> jobs; worker -> jobs + pcd_core; jobs -> pcd_core.spec/catalog only (torch-free);
pcd_core -> none of the service layers nor their frameworks; the API process never loads torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level modules it must never import
FORBIDDEN: dict[str, set[str]] = {
    "pcd_core": {"api", "jobs", "worker", "client", "celery", "sqlalchemy", "fastapi", "boto3",
                 "starlette", "alembic", "httpx"},
    "jobs": {"api", "worker", "client", "torch", "fastapi", "celery"},
    "api": {"worker", "client", "torch", "celery"},
    "client": {"api", "jobs", "worker", "pcd_core", "torch", "sqlalchemy", "celery"},
}
# jobs may use only the torch-free corners of pcd_core
JOBS_ALLOWED_PCD_CORE = {"pcd_core", "pcd_core.spec", "pcd_core.models.catalog"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package: str) -> None:
    files = _package_files(package)
    if not files:
        pytest.skip(f"{package}/ has no modules yet")
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in _imports(path)
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_jobs_uses_only_torch_free_pcd_core() -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _package_files("jobs")
        for name in _imports(path)
        if name.startswith("pcd_core") and name not in JOBS_ALLOWED_PCD_CORE
    ]
    assert not bad, "\n".join(bad)


def test_spec_module_does_not_load_torch() -> None:
    code = "import sys, pcd_core.spec; assert 'torch' not in sys.modules, 'torch was loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
