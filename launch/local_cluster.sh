#!/usr/bin/env bash
# A local multi-node Ray cluster on loopback: a head and one more worker node.
#
#   launch/local_cluster.sh up       # start head (127.0.0.2) + worker node (127.0.0.3)
#   launch/local_cluster.sh status
#   launch/local_cluster.sh down     # stop exactly the processes of this cluster
#
# Ray rewrites a literal 127.0.0.1 to the host's outward address, so the nodes use other
# loopback addresses (all of 127.0.0.0/8 is loopback). The job server requires a token
# (RAY_AUTH_MODE=token): `up` generates one with `ray get-auth-token --generate` if needed.
# Settings (environment): STABLEGAN_RAY_PORT (6390), STABLEGAN_DASHBOARD_PORT (8266),
# STABLEGAN_HEAD_IP (127.0.0.2), STABLEGAN_WORKER_IP (127.0.0.3), STABLEGAN_HEAD_CPUS (1),
# STABLEGAN_WORKER_CPUS (1).
set -euo pipefail

PORT="${STABLEGAN_RAY_PORT:-6390}"
DASH_PORT="${STABLEGAN_DASHBOARD_PORT:-8266}"
HEAD_IP="${STABLEGAN_HEAD_IP:-127.0.0.2}"
WORKER_IP="${STABLEGAN_WORKER_IP:-127.0.0.3}"
HEAD_CPUS="${STABLEGAN_HEAD_CPUS:-1}"
WORKER_CPUS="${STABLEGAN_WORKER_CPUS:-1}"
export RAY_AUTH_MODE=token

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "local_cluster: $*" >&2; exit 1; }
command -v ray >/dev/null || die "ray is not on PATH: activate the project's environment (. .venv/bin/activate)"

port_taken() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

our_pids() {
  # Every process of this cluster names its GCS address or port on its command line.
  pgrep -f -- "(gcs-address|gcs_address|address)[= ]${HEAD_IP}:${PORT}|gcs_server_port=${PORT}|--port=${PORT} " || true
}

up() {
  port_taken "$HEAD_IP" "$PORT" && die "port $HEAD_IP:$PORT is taken (a cluster is up already? run '$0 down', or set STABLEGAN_RAY_PORT)"
  ray get-auth-token >/dev/null 2>&1 || ray get-auth-token --generate >/dev/null
  ray start --head --node-ip-address="$HEAD_IP" --port="$PORT" --dashboard-host="$HEAD_IP" \
    --dashboard-port="$DASH_PORT" --num-cpus="$HEAD_CPUS" --resources='{"node_head": 1}' \
    --disable-usage-stats >/dev/null
  ray start --address="$HEAD_IP:$PORT" --node-ip-address="$WORKER_IP" --num-cpus="$WORKER_CPUS" \
    --resources='{"node_worker": 1}' --disable-usage-stats >/dev/null
  # The job agent comes up after the dashboard: wait until it accepts a (trivial) job.
  local ok=""
  for _ in $(seq 1 90); do
    if timeout 20 ray job submit --address "http://$HEAD_IP:$DASH_PORT" --no-wait -- true >/dev/null 2>&1; then
      ok=1; break
    fi
    sleep 1
  done
  [ -n "$ok" ] || { down >/dev/null; die "the job server at http://$HEAD_IP:$DASH_PORT did not accept jobs; stopped the cluster again"; }
  echo "RAY_ADDRESS=$HEAD_IP:$PORT"
  echo "DASHBOARD=http://$HEAD_IP:$DASH_PORT   (jobs: ray job submit --address http://$HEAD_IP:$DASH_PORT ...)"
}

down() {
  local pids
  pids=$(our_pids)
  [ -z "$pids" ] && { echo "no cluster on $HEAD_IP:$PORT"; return 0; }
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    pids=$(our_pids); [ -z "$pids" ] && break; sleep 0.5
  done
  pids=$(our_pids); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  echo "stopped the cluster on $HEAD_IP:$PORT"
}

status() { ray status --address="$HEAD_IP:$PORT"; }

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  -h|--help|help|"") usage ;;
  *) usage; die "unknown command '$1'" ;;
esac
