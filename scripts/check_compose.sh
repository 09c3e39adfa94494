#!/usr/bin/env bash
# Validate docker-compose.yml (syntax, anchors, depends_on conditions, GPU reservation).
# Uses `docker compose` (v2 plugin) when present, else `docker-compose`; installs Debian's
# docker-compose with apt when neither exists and apt is available. Needs no Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
elif command -v apt-get >/dev/null 2>&1; then
  echo "check_compose: installing docker-compose with apt" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get install -y -q docker-compose >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q docker-compose >/dev/null; }
  compose=(docker-compose)
else
  echo "check_compose: neither docker compose nor docker-compose, and no apt-get" >&2
  exit 1
fi

"${compose[@]}" -f docker-compose.yml config -q
echo "check_compose: docker-compose.yml is valid (${compose[*]})"
