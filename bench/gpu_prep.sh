#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a GPU lease: puts what bench/gpu_lease.sh needs and
# the device lacks into git-ignored folders of this checkout, to be named in the run's carry.
#   .data/camvid  CamVid (train/val), copied from ../shared, which does not travel (37 MB)
#   .whl          wheels of pydantic and its own needs, which the device's image does not hold
#                 (pcd_core's run spec is a pydantic model), at the versions installed here
# Together with the tracked files they stay under the 64 MiB a lease carries.
# Usage: bash bench/gpu_prep.sh        (needs the project's .venv: bash scripts/test.sh makes it)
set -euo pipefail
cd "$(dirname "$0")/.."

src=${PCD_CAMVID:-../shared/datasets/camvid}
[ -d "$src/train" ] && [ -d "$src/val" ] || { echo "gpu_prep: no CamVid at $src" >&2; exit 2; }
mkdir -p .git/info .data
for path in /.data/ /.whl/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
rm -rf .data/camvid && cp -r "$src" .data/camvid

PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_prep: no .venv (run bash scripts/test.sh first)" >&2; exit 2; }
# The versions installed here, so the device runs the pydantic the tests ran with.
mapfile -t pins < <("$PY" - <<'EOF'
from importlib.metadata import version
for name in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection",
             "typing_extensions"):
    print(f"{name}=={version(name)}")
EOF
)
rm -rf .whl && mkdir .whl
# The device's python3 is CPython 3.12 on x86-64 (the device README's package notes).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
du -sh .data/camvid .whl
echo "gpu_prep: ready; carry .data and .whl (see bench/README.md, 'The GPU table')"
