#!/usr/bin/env bash
# Installs stablegan and its dependencies into a virtual environment (default .venv).
# The one install recipe: `make setup`, .ci/run and docker/Dockerfile all run this script.
#
#   docker/install.sh [VENV_DIR]        STABLEGAN_EXTRAS=server adds the MLflow server's drivers;
#                                       STABLEGAN_DEV=1 adds those and the test tools
#
# torch comes first and pinned, so no resolver ever chooses it: on a machine without an
# NVIDIA GPU, torch==2.13.0 (a CPU build; on this project's CPU machines pip takes a local
# file in seconds); with a GPU, the standard wheel of the same version from PyPI (CUDA).
set -euo pipefail
VENV="${1:-.venv}"
TORCH_VERSION="${STABLEGAN_TORCH_VERSION:-2.13.0}"
cd "$(dirname "$0")/.."

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
# Extras: server (psycopg for a PostgreSQL-backed MLflow, boto3 for S3 artifacts), dev (tests).
extras="${STABLEGAN_EXTRAS:-}"
[ "${STABLEGAN_DEV:-0}" = "1" ] && extras="dev,server"
# torch is already satisfied, so this adds deepspeed, ray, webdataset, mlflow, hydra, ... at
# the versions in docker/constraints.txt.
"$PY" -m pip install -q -c docker/constraints.txt -e ".${extras:+[$extras]}"
"$PY" - <<'PY'
import deepspeed, hydra, mlflow, ray, torch, webdataset  # noqa: F401
print(f"stablegan env ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"ray {ray.__version__}, mlflow {mlflow.__version__}, cuda={torch.cuda.is_available()}")
PY
