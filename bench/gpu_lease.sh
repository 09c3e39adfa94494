#!/usr/bin/env bash
# The one command a GPU lease runs (from the repository root, on the device): the step-time
# ratios on CUDA, then the gpu-scale accuracy table within a time budget. Prepared and tested
# on CPU first (SCALE=smoke), because a lease is minutes of device time, all tries together.
#
#   bash bench/gpu_lease.sh                      # on the device, after bench/gpu_prep.sh here
#   SCALE=smoke DEVICE=cpu bash bench/gpu_lease.sh   # the same path on CPU in about a minute
#
# Environment: OUT (where results go; the lease's $OUT), SCALE (gpu), DEVICE (cuda),
# STEP_S (cap on the step-time run, 100), TABLE_S (seconds for the accuracy table, 330:
# students that would end later are not started, see accuracy.py --deadline; the teacher
# always trains, and the table is stopped at TABLE_S + 60), SEEDS ("0 1"), TEACHER (the
# scale's, ResNet-101 at gpu), RUNS_DIR (runs/bench). At most about 8.5 minutes: run it with timeout_s 540.
# Writes $OUT/accuracy_<scale>.json, $OUT/step_time_<device>.json, their logs and gpu.txt
# (five files; a lease brings back at most eight).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/lease}
SCALE=${SCALE:-gpu}
DEVICE=${DEVICE:-cuda}
TABLE_S=${TABLE_S:-330}
STEP_S=${STEP_S:-100}
PY=${PYTHON:-python3}  # the device's python3 holds torch; here: PYTHON=.venv/bin/python
SEEDS=${SEEDS:-0 1}
RUNS_DIR=${RUNS_DIR:-runs/bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .data/camvid ] && export PCD_CAMVID="$PWD/.data/camvid"

# pydantic from the wheels bench/gpu_prep.sh carried, where this python lacks it (the device)
if ! "$PY" -c "import pydantic" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo "nvidia-smi: none"
  "$PY" -c "import torch, pydantic; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'pydantic', pydantic.VERSION)"
} 2>&1 | tee "$OUT/gpu.txt"

start=$(date +%s)
# Step times first: they are short, and they are what a cut-off table cannot give (the
# teacher's and each method's seconds per step here, to size the next lease's budgets).
timeout --signal=INT --kill-after=10 "$STEP_S" \
  "$PY" bench/step_time.py --scale "$SCALE" --device "$DEVICE" --methods teacher ce kd cwd pcd \
    --repeats 5 --steps 3 --out "$OUT/step_time_$DEVICE.json" 2>&1 | tee "$OUT/step_time.log"
step_rc=${PIPESTATUS[0]}
echo "[lease] step_time rc=$step_rc after $(( $(date +%s) - start ))s" | tee -a "$OUT/step_time.log"

table_start=$(date +%s)
table_end=$((table_start + TABLE_S + 60))
deadline=$(date -d "@$((table_start + TABLE_S))" +%H:%M)
# accuracy.py, stopped at table_end; the JSON it writes grows run by run
accuracy() {
  local left=$((table_end - $(date +%s)))
  [ "$left" -gt 5 ] || { echo "[lease] no time left for: $*"; return 124; }
  # shellcheck disable=SC2086  # SEEDS is a list
  timeout --signal=INT --kill-after=10 "$left" \
    "$PY" bench/accuracy.py --scale "$SCALE" --students deeplabv3_resnet18 --seeds $SEEDS \
      ${TEACHER:+--teacher "$TEACHER"} --runs-dir "$RUNS_DIR" "$@"
}
# CE, KD and PCD on every seed before CWD on any: the issue's two PCD targets need those
# three, so a table cut off by the deadline keeps the pairs that matter most. The teacher
# trains in the first call. The last call trains nothing: it writes the combined table.
{
  accuracy --methods none kd pcd --deadline "$deadline" --out "$RUNS_DIR/first.json"
  first_rc=$?
  accuracy --methods cwd --deadline "$deadline" --out "$RUNS_DIR/cwd.json"
  accuracy --methods none kd pcd cwd --table-only --out "$OUT/accuracy_$SCALE.json"
  table_rc=$?
  [ "$first_rc" -eq 0 ] || table_rc=$first_rc
  echo "[lease] accuracy rc=$table_rc; total $(( $(date +%s) - start ))s"
  exit "$table_rc"
} 2>&1 | tee "$OUT/accuracy.log"
table_rc=${PIPESTATUS[0]}
[ "$step_rc" -eq 0 ] && [ "$table_rc" -eq 0 ]
