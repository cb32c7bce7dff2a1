#!/usr/bin/env bash
# Submit `python -m trainer.main ARGS...` to a Ray cluster's job server and stream its logs.
#
#   launch/submit.sh [--address http://127.0.0.2:8266] -- trainer.num_workers=2 trainer.max_steps=500
#
# The address defaults to $RAY_JOB_ADDRESS (what launch/local_cluster.sh up prints). The working
# directory (this repository) is uploaded with --working-dir. MLflow settings and credentials
# travel in the job's environment (--runtime-env-json), never on the command line:
# MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD and AWS_* are
# forwarded when set. The Ray token comes from $RAY_AUTH_TOKEN or `ray get-auth-token`.
# The exit status is the job's: a failed job fails this script.
set -euo pipefail

ADDRESS="${RAY_JOB_ADDRESS:-http://${STABLEGAN_HEAD_IP:-127.0.0.2}:${STABLEGAN_DASHBOARD_PORT:-8266}}"
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "submit: error: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS="${2:?--address needs a URL}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option '$1'" ;;
    *) break ;;
  esac
done
export RAY_AUTH_MODE=token
command -v ray >/dev/null || die "ray is not on PATH: activate the project's environment (. .venv/bin/activate)"
if [ -z "${RAY_AUTH_TOKEN:-}" ] && ! ray get-auth-token >/dev/null 2>&1; then
  die "no Ray auth token: set RAY_AUTH_TOKEN to the cluster's token, or start a local cluster with launch/local_cluster.sh up (it creates one)"
fi
python3 - "$ADDRESS" <<'PY' || die "no Ray job server answers at $ADDRESS: start a cluster (launch/local_cluster.sh up) or pass --address http://HEAD:8265"
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/api/version", timeout=10)
except urllib.error.HTTPError:
    pass  # it answered (e.g. 401 without the token): the server is there
PY

env_json=$(python3 - <<'PY'
import json, os
keys = [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_")) or k == "RAY_AUTH_MODE"]
print(json.dumps({"env_vars": {k: os.environ[k] for k in keys}}))
PY
)
cd "$(dirname "$0")/.."
exec ray job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$env_json" -- python -m trainer.main "$@"
