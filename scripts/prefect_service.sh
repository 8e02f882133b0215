#!/usr/bin/env bash
# Start or stop a local Prefect server + process worker and register the deployments of prefect.yaml.
#   scripts/prefect_service.sh start [PORT]    (default port 4200; state under .run/)
#   scripts/prefect_service.sh stop
# Binds to 127.0.0.1 only and disables every telemetry channel (see README, "Offline by design").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN=${DYNFACE_RUN_DIR:-$ROOT/.run}
BIN=${DYNFACE_BIN:-$ROOT/.venv/bin}
POOL=dynface-local  # the work pool named in prefect.yaml (deployments register against that name)
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 AWS_EC2_METADATA_DISABLED=true
# Loopback traffic (CLI, worker and health checks to the server) never goes through a proxy.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
export PREFECT_HOME="$RUN/prefect"
export DYNFACE_ROOT="$ROOT"
mkdir -p "$RUN" "$PREFECT_HOME"

stop_pid() {
  local file=$1
  if [ -f "$file" ]; then
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
      kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 -- -"$pid" 2>/dev/null || true
    fi
    rm -f "$file"
  fi
}

stop_all() {
  stop_pid "$RUN/worker.pid"   # the worker first, then the server it talks to
  stop_pid "$RUN/server.pid"
}

case "${1:-}" in
  start)
    PORT=${2:-${PREFECT_PORT:-4200}}
    for name in server worker; do
      if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
        echo "A Prefect $name from $RUN is already running; run '$0 stop' first." >&2
        exit 1
      fi
    done
    # A start that fails half-way stops what it started, so no orphan server keeps the port.
    trap 'echo "start failed; stopping what was started" >&2; stop_all' ERR
    export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
    echo "$PREFECT_API_URL" > "$RUN/api_url"
    # The server looks up Prefect's collection registry (https, GitHub) when a work pool is created
    # and falls back to a bundled copy: a dead loopback proxy makes that lookup fail at once, on
    # this machine, instead of reaching for the internet.
    HTTPS_PROXY=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 \
      setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" > "$RUN/server.log" 2>&1 &
    echo $! > "$RUN/server.pid"
    for i in $(seq 1 120); do
      if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; then
        break
      fi
      if [ "$i" = 120 ]; then
        echo "Prefect server did not become healthy; see $RUN/server.log" >&2
        stop_all
        exit 1
      fi
      sleep 0.5
    done
    "$BIN/prefect" work-pool inspect "$POOL" > /dev/null 2>&1 \
      || "$BIN/prefect" work-pool create "$POOL" --type process > /dev/null
    "$BIN/prefect" --no-prompt deploy --all > "$RUN/deploy.log" 2>&1 \
      || { cat "$RUN/deploy.log" >&2; stop_all; exit 1; }
    PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2} \
      setsid "$BIN/prefect" worker start --pool "$POOL" > "$RUN/worker.log" 2>&1 &
    echo $! > "$RUN/worker.pid"
    trap - ERR
    echo "Prefect server at $PREFECT_API_URL, worker on pool '$POOL' (logs in $RUN)."
    echo "Run:  PREFECT_API_URL=$PREFECT_API_URL $BIN/prefect deployment run restore-archive/nightly --watch"
    ;;
  stop)
    stop_all
    echo "Prefect worker and server stopped."
    ;;
  *)
    echo "usage: $0 start [PORT] | stop" >&2
    exit 2
    ;;
esac
