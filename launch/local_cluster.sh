#!/usr/bin/env bash
# A local multi-node Ray cluster on loopback, plus an MLflow server: the cluster on one machine.
#
#   launch/local_cluster.sh up [--workers N] [--backend-store-uri URI] [--no-mlflow]
#   launch/local_cluster.sh status
#   launch/local_cluster.sh down      # stops exactly what `up` started, nothing else
#
# up starts a Ray head on 127.0.0.2 and N worker nodes on 127.0.0.3, 127.0.0.4, ... (all of
# 127.0.0.0/8 is loopback; Ray rewrites a literal 127.0.0.1 to the host's outward address).
# Every node has its own custom resource (node_head, node_worker_1, ...) and one
# `stablegan_slot`, so `trainer.worker_resources={stablegan_slot:1}` puts each training worker
# on a different node. The MLflow server listens on 127.0.0.1 with a sqlite store under
# ./mlflow-server (kept across down/up), or on --backend-store-uri (e.g.
# postgresql://USER:PASS@127.0.0.1:5432/mlflow; needs psycopg, which `make setup-dev` installs).
# up prints the addresses and writes them, as shell assignments, to $STATE_DIR/env.
#
# Options may also come from the environment: STABLEGAN_RAY_PORT (6390), STABLEGAN_DASHBOARD_PORT
# (8266), STABLEGAN_HEAD_IP (127.0.0.2), STABLEGAN_WORKERS (1), STABLEGAN_HEAD_CPUS (1),
# STABLEGAN_WORKER_CPUS (1), STABLEGAN_MLFLOW_PORT (5000), STABLEGAN_MLFLOW_HOST (127.0.0.1),
# STABLEGAN_MLFLOW_DIR (./mlflow-server), STABLEGAN_STATE_DIR (/tmp/stablegan-cluster-PORT).
# The job server requires a token (RAY_AUTH_MODE=token): up generates one if there is none.
set -euo pipefail

PORT="${STABLEGAN_RAY_PORT:-6390}"
DASH_PORT="${STABLEGAN_DASHBOARD_PORT:-8266}"
HEAD_IP="${STABLEGAN_HEAD_IP:-127.0.0.2}"
WORKERS="${STABLEGAN_WORKERS:-1}"
HEAD_CPUS="${STABLEGAN_HEAD_CPUS:-1}"
WORKER_CPUS="${STABLEGAN_WORKER_CPUS:-1}"
MLFLOW_PORT="${STABLEGAN_MLFLOW_PORT:-5000}"
MLFLOW_HOST="${STABLEGAN_MLFLOW_HOST:-127.0.0.1}"
MLFLOW_DIR="${STABLEGAN_MLFLOW_DIR:-$PWD/mlflow-server}"
BACKEND_URI=""
WITH_MLFLOW=1
export RAY_AUTH_MODE=token

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

port_taken() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
redact() { sed -E 's#(://)[^/@ ]+@#\1***@#g' <<<"$1"; }  # a URI's user:password part

our_ray_pids() {
  # Every process of this cluster names its GCS address or port on its command line.
  pgrep -f -- "(gcs-address|gcs_address|address)[= ]${HEAD_IP}:${PORT}|gcs_server_port=${PORT}|--port=${PORT} " || true
}

worker_ip() { echo "127.0.0.$((2 + $1))"; }

# A free TCP port on address $1. Ray's fixed defaults (dashboard agent 52365, Ray client
# 10001) collide with any other Ray on the machine; the agent then serves no jobs.
free_port() {
  python3 -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$1"
}

start_mlflow() {
  local backend="${BACKEND_URI:-sqlite:///$MLFLOW_DIR/mlflow.db}"
  if [[ "$backend" == postgresql* ]] && ! python -c "import psycopg" 2>/dev/null; then
    die "--backend-store-uri $(redact "$backend") needs psycopg in this environment: pip install 'psycopg[binary]' (make setup-dev installs it)"
  fi
  mkdir -p "$MLFLOW_DIR"
  # Its own session (setsid): `down` stops the server and the workers it forks as one group.
  # The store URI (which may hold a database password) goes through the environment, not the
  # command line that every local user can read in the process list.
  MLFLOW_BACKEND_STORE_URI="$backend" setsid mlflow server --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" \
    --workers 1 --artifacts-destination "$MLFLOW_DIR/artifacts" \
    >"$STATE_DIR/mlflow.log" 2>&1 < /dev/null &
  echo "$! $MLFLOW_PORT" >"$STATE_DIR/mlflow.pid"
  for _ in $(seq 1 120); do
    if python - "$MLFLOW_HOST" "$MLFLOW_PORT" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/health", timeout=2)
PY
    kill -0 "$(cut -d' ' -f1 "$STATE_DIR/mlflow.pid")" 2>/dev/null || break
    sleep 1
  done
  tail -n 20 "$STATE_DIR/mlflow.log" >&2 || true
  return 1
}

up() {
  [[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a number, got '$WORKERS'"
  command -v ray >/dev/null || die "ray is not on PATH: activate the project's environment (. .venv/bin/activate)"
  port_taken "$HEAD_IP" "$PORT" && die "port $HEAD_IP:$PORT is taken (a cluster is up already? run '$0 down', or set STABLEGAN_RAY_PORT)"
  port_taken "$HEAD_IP" "$DASH_PORT" && die "dashboard port $HEAD_IP:$DASH_PORT is taken: set STABLEGAN_DASHBOARD_PORT"
  if [ "$WITH_MLFLOW" = 1 ]; then
    command -v mlflow >/dev/null || die "mlflow is not on PATH: activate the project's environment"
    port_taken "$MLFLOW_HOST" "$MLFLOW_PORT" && die "MLflow port $MLFLOW_HOST:$MLFLOW_PORT is taken: set STABLEGAN_MLFLOW_PORT or pass --no-mlflow"
  fi
  mkdir -p "$STATE_DIR"
  ray get-auth-token >/dev/null 2>&1 || ray get-auth-token --generate >/dev/null \
    || die "could not create a Ray auth token (ray get-auth-token --generate)"

  # Ray Train's placement-group cleaner asks the state API whether a run's controller lives;
  # unpointed, it may ask another Ray on this machine, find none there and end the run's workers.
  export RAY_API_SERVER_ADDRESS="http://$HEAD_IP:$DASH_PORT"
  ray start --head --node-ip-address="$HEAD_IP" --port="$PORT" --dashboard-host="$HEAD_IP" \
    --dashboard-port="$DASH_PORT" --num-cpus="$HEAD_CPUS" \
    --dashboard-agent-listen-port="$(free_port "$HEAD_IP")" --ray-client-server-port="$(free_port "$HEAD_IP")" \
    --resources='{"node_head": 1, "stablegan_slot": 1}' --disable-usage-stats >/dev/null
  for i in $(seq 1 "$WORKERS"); do
    ray start --address="$HEAD_IP:$PORT" --node-ip-address="$(worker_ip "$i")" --num-cpus="$WORKER_CPUS" \
      --dashboard-agent-listen-port="$(free_port "$(worker_ip "$i")")" \
      --resources="{\"node_worker_$i\": 1, \"stablegan_slot\": 1}" --disable-usage-stats >/dev/null
  done
  # The job agent comes up after the dashboard: wait until it accepts a (trivial) job.
  local ok=""
  for _ in $(seq 1 90); do
    if timeout 20 ray job submit --address "http://$HEAD_IP:$DASH_PORT" --no-wait -- true >/dev/null 2>&1; then
      ok=1; break
    fi
    sleep 1
  done
  [ -n "$ok" ] || { down >/dev/null; die "the job server at http://$HEAD_IP:$DASH_PORT did not accept jobs; stopped the cluster again"; }

  {
    echo "RAY_ADDRESS=$HEAD_IP:$PORT"
    echo "RAY_JOB_ADDRESS=http://$HEAD_IP:$DASH_PORT"
  } >"$STATE_DIR/env"
  if [ "$WITH_MLFLOW" = 1 ]; then
    start_mlflow || { down >/dev/null; die "the MLflow server did not start (log above: $STATE_DIR/mlflow.log); stopped the cluster again"; }
    echo "MLFLOW_TRACKING_URI=http://$MLFLOW_HOST:$MLFLOW_PORT" >>"$STATE_DIR/env"
  fi
  cat "$STATE_DIR/env"
  echo "# nodes: head $HEAD_IP (node_head)$(for i in $(seq 1 "$WORKERS"); do printf ', %s (node_worker_%s)' "$(worker_ip "$i")" "$i"; done)"
  echo "# use:   set -a; . $STATE_DIR/env; set +a   then launch/submit.sh -- trainer.num_workers=2 ..."
}

down() {
  local pids pid port stopped=""
  if [ -f "$STATE_DIR/mlflow.pid" ]; then
    read -r pid port <"$STATE_DIR/mlflow.pid"
    # Only the group we started: the pid must still be an mlflow server on the port we gave it.
    if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "mlflow.*--port $port "; then
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      stopped="the MLflow server on port $port"
    fi
    rm -f "$STATE_DIR/mlflow.pid"
  fi
  pids=$(our_ray_pids)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086 # one pid per word
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
      pids=$(our_ray_pids); [ -z "$pids" ] && break; sleep 0.5
    done
    # shellcheck disable=SC2086
    [ -n "$pids" ] && { kill -KILL $pids 2>/dev/null || true; }
    stopped="${stopped:+$stopped and }the Ray cluster on $HEAD_IP:$PORT"
  fi
  rm -f "$STATE_DIR/env"
  if [ -n "$stopped" ]; then echo "stopped $stopped"; else echo "nothing to stop: no cluster on $HEAD_IP:$PORT"; fi
}

status() {
  [ -f "$STATE_DIR/env" ] || die "no cluster on $HEAD_IP:$PORT (nothing in $STATE_DIR): start one with '$0 up'"
  cat "$STATE_DIR/env"
  ray status --address="$HEAD_IP:$PORT"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS="${2:?--workers needs a number}"; shift 2 ;;
    --backend-store-uri) BACKEND_URI="${2:?--backend-store-uri needs a URI}"; shift 2 ;;
    --no-mlflow) WITH_MLFLOW=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
STATE_DIR="${STABLEGAN_STATE_DIR:-${TMPDIR:-/tmp}/stablegan-cluster-$PORT}"

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  -h|--help|help|"") usage ;;
  *) usage >&2; die "unknown command '$cmd' (use up, status or down)" ;;
esac
