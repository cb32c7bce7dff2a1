#!/usr/bin/env bash
# Submit `python -m trainer.main ARGS...` to a Ray cluster's job server and stream its logs.
#
#   launch/submit.sh [--address http://127.0.0.2:8266] -- trainer.num_workers=2 trainer.max_steps=500
#
# The address defaults to $RAY_JOB_ADDRESS (what launch/local_cluster.sh up prints). The working
# directory (this repository) is uploaded with --working-dir. Only settings that are not secret
# travel with the job (--runtime-env-json, which is on this command line and stored with the
# job, visible in the dashboard and `ray job list`): MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI
# (without any user:password part), MLFLOW_EXPERIMENT_NAME, MLFLOW_S3_ENDPOINT_URL,
# AWS_ENDPOINT_URL, AWS_REGION and AWS_DEFAULT_REGION. Credentials (MLFLOW_TRACKING_PASSWORD,
# MLFLOW_TRACKING_TOKEN, AWS_SECRET_ACCESS_KEY, ... every other MLFLOW_* and AWS_* variable) are
# never forwarded: the cluster's nodes take them from their own environment (what
# launch/local_cluster.sh up, the cluster launcher YAML, KubeRay's Secret or compose give them).
# The script names what it dropped. The Ray token comes from $RAY_AUTH_TOKEN or
# `ray get-auth-token`. The exit status is the job's: a failed job fails this script.
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
import json, os, re, sys

SETTINGS = {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"}
userinfo = re.compile(r"(?<=://)[^/@\s]+@")
env, dropped = {"RAY_AUTH_MODE": "token"}, []
for key, value in sorted(os.environ.items()):
    if key in SETTINGS:
        if userinfo.search(value):
            dropped.append(f"the user:password part of {key}")
        env[key] = userinfo.sub("", value)
    elif key.startswith(("MLFLOW_", "AWS_")):
        dropped.append(key)
if dropped:
    print("submit: not forwarded to the job (secrets stay here; the cluster's nodes take their own "
          f"from their environment): {', '.join(dropped)}", file=sys.stderr)
print(json.dumps({"env_vars": env}))
PY
)
cd "$(dirname "$0")/.."
exec ray job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$env_json" -- python -m trainer.main "$@"
