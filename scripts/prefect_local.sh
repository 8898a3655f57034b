#!/usr/bin/env bash
# A local Prefect server + process work pool + worker for the BLT pipeline (see docs/ORCHESTRATION.md).
#
#   scripts/prefect_local.sh start    start `prefect server` on 127.0.0.1:$PORT (UI: http://127.0.0.1:$PORT)
#   scripts/prefect_local.sh pool     create the `blt-process` process work pool (idempotent)
#   scripts/prefect_local.sh deploy   deploy everything in prefect.yaml (or: deploy NAME ..., e.g. tiny-cpu)
#   scripts/prefect_local.sh worker   start a worker on the pool in the background (extra args go to
#                                     `prefect worker start`, e.g. --work-queue default)
#   scripts/prefect_local.sh up       start + pool + deploy + worker
#   scripts/prefect_local.sh status   what is running
#   scripts/prefect_local.sh stop     stop the worker and the server
#   scripts/prefect_local.sh env      print `export PREFECT_API_URL=...` (eval "$(scripts/prefect_local.sh env)")
#
# Logs and pid files live in .prefect-local/; the server's database in .prefect-local/home (PREFECT_HOME)
# unless PREFECT_HOME is set. Settings: PORT (4200), POOL (blt-process), PYTHON (.venv/bin/python if present).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.prefect-local"
PORT="${PORT:-4200}"
POOL="${POOL:-blt-process}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
PREFECT=("$PYTHON" -m prefect)

mkdir -p "$STATE"
export PREFECT_HOME="${PREFECT_HOME:-$STATE/home}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export PREFECT_UI_URL="http://127.0.0.1:$PORT"
export BLT_PROJECT_DIR="${BLT_PROJECT_DIR:-$ROOT}"   # the deployments' pull step changes into it
export WANDB_MODE="${WANDB_MODE:-offline}"
# a worker polls every 15 s by default; 5 s makes the UI feel responsive on a laptop
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}"

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_healthy() {
  local i
  for i in $(seq 1 120); do
    if "$PYTHON" - "$PREFECT_API_URL/health" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
PY
    if ! alive "$STATE/server.pid"; then
      echo "prefect server exited; see $STATE/server.log" >&2; tail -20 "$STATE/server.log" >&2; return 1
    fi
    sleep 1
  done
  echo "prefect server did not become healthy in 120 s; see $STATE/server.log" >&2
  return 1
}

cmd_start() {
  if alive "$STATE/server.pid"; then
    echo "server already running (pid $(cat "$STATE/server.pid")): $PREFECT_UI_URL"; return 0
  fi
  # setsid: the server and its children form one process group, so `stop` ends all of them
  setsid "${PREFECT[@]}" server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
  echo $! >"$STATE/server.pid"
  wait_healthy
  echo "server up: $PREFECT_UI_URL (API $PREFECT_API_URL, logs $STATE/server.log)"
}

cmd_pool() {
  if "${PREFECT[@]}" work-pool inspect "$POOL" >/dev/null 2>&1; then
    echo "work pool $POOL exists"
  else
    "${PREFECT[@]}" work-pool create "$POOL" --type process
  fi
}

cmd_deploy() {
  cd "$ROOT"
  local args=(--all) n
  if [[ $# -gt 0 ]]; then args=(); for n in "$@"; do args+=(--name "$n"); done; fi
  # deploy with BLT_PROJECT_DIR unset, so the pull step keeps `{{ $BLT_PROJECT_DIR }}` and each worker
  # resolves it when a run starts (set, prefect deploy would bake this machine's path into the deployment)
  env -u BLT_PROJECT_DIR "${PREFECT[@]}" --no-prompt deploy "${args[@]}"
}

cmd_worker() {
  if alive "$STATE/worker.pid"; then echo "worker already running (pid $(cat "$STATE/worker.pid"))"; return 0; fi
  cd "$ROOT"
  setsid "${PREFECT[@]}" worker start --pool "$POOL" "$@" >"$STATE/worker.log" 2>&1 &
  echo $! >"$STATE/worker.pid"
  sleep 2
  alive "$STATE/worker.pid" || { echo "worker exited; see $STATE/worker.log" >&2; tail -20 "$STATE/worker.log" >&2; return 1; }
  echo "worker on pool $POOL (pid $(cat "$STATE/worker.pid"), logs $STATE/worker.log)"
}

descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }

stop_one() {
  local name=$1 pidfile="$STATE/$1.pid" pid i kids
  if ! alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
  pid=$(cat "$pidfile")
  # flow runs a worker started live in their own sessions (and training in theirs): stop them too
  kids=$(descendants "$pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  # shellcheck disable=SC2086
  [[ -n "$kids" ]] && kill -TERM $kids 2>/dev/null || true
  for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  for i in $(seq 1 30); do
    # shellcheck disable=SC2086
    [[ -z "$kids" ]] || ! kill -0 $kids 2>/dev/null && break; sleep 0.5
  done
  # shellcheck disable=SC2086
  [[ -n "$kids" ]] && kill -KILL $kids 2>/dev/null || true
  rm -f "$pidfile"
  echo "stopped $name (pid $pid)"
}

cmd_stop() { stop_one worker; stop_one server; }

cmd_status() {
  local n
  for n in server worker; do
    if alive "$STATE/$n.pid"; then echo "$n: running (pid $(cat "$STATE/$n.pid"))"; else echo "$n: stopped"; fi
  done
  echo "UI: $PREFECT_UI_URL"
}

case "${1:-}" in
  start) cmd_start ;;
  pool) cmd_pool ;;
  deploy) shift; cmd_deploy "$@" ;;
  worker) shift; cmd_worker "$@" ;;
  up) cmd_start; cmd_pool; cmd_deploy; cmd_worker ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export PREFECT_API_URL=$PREFECT_API_URL" ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
