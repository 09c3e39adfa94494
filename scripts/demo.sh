#!/usr/bin/env bash
# The README's first command: the main job end to end on the embedded default.
#
#   bash scripts/demo.sh
#
# Installs into .venv (as scripts/test.sh does), starts `pcd serve` (SQLite, the filesystem
# Celery broker, file:// storage, one local worker, the reaper; state under var/demo), creates
# an API key, uploads the dataset, trains a small teacher AS A JOB (the demo has no teacher to
# bring), uploads the teacher's weights as a checkpoint, submits a PCD distill job, watches
# its progress, downloads the student (sha256-verified) and scores it on the val split with
# the engine's own `python -m pcd_core eval`.
#
# Knobs (environment): DATA (a folder-format dataset; default ../shared/datasets/camvid),
# PORT (8765), TEACHER_ITERS (300), STUDENT_ITERS (200), KEEP_SERVING=1 (leave the service up),
# TEACHER_CKPT (a DeepLabV3-ResNet50 state dict, .safetensors or .pt, trained at output
# stride 16 on the same classes: it is uploaded and job 1 is skipped).
# The default budget is sized for a 2-core CPU (about 20 minutes in all, most of it the
# teacher); the student it produces is a demonstration, not a benchmark: bench/README.md has
# the measured comparisons.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DATA=${DATA:-$ROOT/../shared/datasets/camvid}
PORT=${PORT:-8765}
TEACHER_ITERS=${TEACHER_ITERS:-300}
STUDENT_ITERS=${STUDENT_ITERS:-200}
DEMO=$ROOT/var/demo
[ -d "$DATA" ] || { echo "demo: dataset folder $DATA not found (set DATA=...)" >&2; exit 2; }
DATA=$(cd "$DATA" && pwd)
TEACHER_CKPT=${TEACHER_CKPT:-}
if [ -n "$TEACHER_CKPT" ]; then
  [ -f "$TEACHER_CKPT" ] || { echo "demo: TEACHER_CKPT $TEACHER_CKPT is not a file" >&2; exit 2; }
  TEACHER_CKPT=$(cd "$(dirname "$TEACHER_CKPT")" && pwd)/$(basename "$TEACHER_CKPT")
fi

# -- install (idempotent) ----------------------------------------------------------------
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,prod,dev]"

# -- the embedded service ------------------------------------------------------------------
mkdir -p "$DEMO"
export PCD_DATABASE_URL="sqlite:///$DEMO/pcd.db"
export PCD_BROKER_URL="filesystem://$DEMO/broker"
export PCD_STORAGE_URL="file://$DEMO/objects"
export PCD_CACHE_DIR="$DEMO/cache" PCD_WORK_DIR="$DEMO/work"
export PCD_API_URL="http://127.0.0.1:$PORT"

echo "== starting the service (logs: $DEMO/serve.log)"
pcd serve --port "$PORT" >"$DEMO/serve.log" 2>&1 &
SERVE_PID=$!
stop_service() {
  if [ "${KEEP_SERVING:-0}" = 1 ]; then
    echo "== the service keeps running (pid $SERVE_PID, $PCD_API_URL); stop it with: kill $SERVE_PID"
  else
    kill -INT "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
  fi
}
trap stop_service EXIT
for _ in $(seq 1 120); do
  if curl -fsS "$PCD_API_URL/readyz" >/dev/null 2>&1; then break; fi
  kill -0 "$SERVE_PID" 2>/dev/null || { tail -20 "$DEMO/serve.log" >&2; exit 1; }
  sleep 1
done
curl -fsS "$PCD_API_URL/readyz" >/dev/null || { echo "demo: service not ready" >&2; exit 1; }

PCD_API_KEY=$(pcd keys create --team demo --name demo 2>/dev/null)
export PCD_API_KEY

echo "== uploading the dataset $DATA"
DATASET=$(pcd upload -q "$DATA" --kind dataset)
echo "   $DATASET"

# CamVid frames are 360x480; the demo trains on 120x160 (1/3 linear) at output stride 16,
# which is what a 2-core CPU affords. The spec is the same one the CLI and bench use.
cat >"$DEMO/common.yaml" <<EOF
dataset:
  uri: $DATASET
  format: folder
  num_classes: 11
  ignore_index: 11
  class_names: [sky, building, pole, road, sidewalk, tree, sign_symbol, fence, car,
                pedestrian, bicyclist]
  resize: [120, 160]
  crop: [120, 160]
  scale_range: [0.75, 1.5]
train:
  batch_size: 8
  lr: 0.02
  warmup_iterations: 10
  num_workers: 1
  eval_every: 100
  checkpoint_every: 50
  log_every: 10
  seed: 0
resources: {gpus: 0, queue: cpu}
EOF

if [ -n "$TEACHER_CKPT" ]; then
  echo "== job 1/2 skipped: uploading the teacher $TEACHER_CKPT"
  TEACHER=$(pcd upload -q "$TEACHER_CKPT" --kind checkpoint)
else
  echo "== job 1/2: train a DeepLabV3-ResNet50 teacher ($TEACHER_ITERS iterations, plain CE)"
  cat "$DEMO/common.yaml" - >"$DEMO/teacher.yaml" <<EOF
name: demo-teacher-r50
student: {arch: deeplabv3_resnet50, output_stride: 16}
method: {name: none}
EOF
  TEACHER_JOB=$(pcd submit -q "$DEMO/teacher.yaml" --set "train.iterations=$TEACHER_ITERS")
  pcd watch "$TEACHER_JOB"
  pcd fetch "$TEACHER_JOB" --out "$DEMO/teacher"
  TEACHER=$(pcd upload -q "$DEMO/teacher/student.safetensors" --kind checkpoint)
fi

echo "== job 2/2: PCD-distil it into DeepLabV3-ResNet18 ($STUDENT_ITERS iterations)"
cat "$DEMO/common.yaml" - >"$DEMO/distill.yaml" <<EOF
name: demo-pcd-r18
teacher: {arch: deeplabv3_resnet50, output_stride: 16, checkpoint: $TEACHER}
student: {arch: deeplabv3_resnet18, output_stride: 16}
method: {name: pcd}
EOF
STUDENT_JOB=$(pcd submit -q "$DEMO/distill.yaml" --set "train.iterations=$STUDENT_ITERS")
pcd watch "$STUDENT_JOB"
rm -rf "$DEMO/student"
pcd fetch "$STUDENT_JOB" --out "$DEMO/student"

echo "== scoring the downloaded student on $DATA (val) with python -m pcd_core eval"
python -m pcd_core eval --model "$DEMO/student" --data "$DATA" --split val \
  --resize 120 160 --json "$DEMO/student/val.json" >/dev/null
python - "$DEMO/student/val.json" "$DEMO/student/model.json" <<'EOF'
import json, sys
val, meta = (json.load(open(p)) for p in sys.argv[1:3])
print(f"student {meta['arch']}: val mIoU {100 * val['miou']:.2f}  "
      f"pixel acc {100 * val['pixel_acc']:.2f}  boundary F {100 * val['boundary_f']:.2f}")
EOF
echo "== done: the deployable student is in $DEMO/student"
ls -l "$DEMO/student"
