#!/usr/bin/env bash
# Submit `python -m trainer.main ARGS...` to a Ray cluster's job server and stream its logs.
#
#   launch/submit.sh [--address http://127.0.0.2:8266] -- trainer.num_workers=2 trainer.max_steps=500
#
# The working directory (this repository) is uploaded with --working-dir. MLflow settings and
# credentials travel in the job's environment, never on the command line: MLFLOW_TRACKING_URI,
# MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD and AWS_* are forwarded when set.
# The exit status is the job's: a failed job fails this script.
set -euo pipefail

ADDRESS="${RAY_JOB_ADDRESS:-http://${STABLEGAN_HEAD_IP:-127.0.0.2}:${STABLEGAN_DASHBOARD_PORT:-8266}}"
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
export RAY_AUTH_MODE=token
command -v ray >/dev/null || { echo "submit: ray is not on PATH" >&2; exit 1; }
ray get-auth-token >/dev/null 2>&1 || { echo "submit: no Ray auth token; start the cluster with launch/local_cluster.sh up" >&2; exit 1; }

env_json=$(python3 - <<'PY'
import json, os
keys = [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_")) or k == "RAY_AUTH_MODE"]
print(json.dumps({"env_vars": {k: os.environ[k] for k in keys}}))
PY
)
cd "$(dirname "$0")/.."
exec ray job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$env_json" -- python -m trainer.main "$@"
