#!/usr/bin/env bash
# Installs stablegan and its dependencies into a virtual environment (default .venv).
# The one install recipe: `make setup`, .ci/run and docker/Dockerfile all run this script.
#
#   docker/install.sh [VENV_DIR]        STABLEGAN_EXTRAS=server adds the MLflow server's drivers;
#                                       STABLEGAN_DEV=1 adds those and the test tools
#
# torch comes first and pinned, so no resolver ever chooses it. With an NVIDIA GPU: PyPI's
# wheel (the CUDA build). Without one, on Linux: the CPU build from PyTorch's CPU index
# (STABLEGAN_TORCH_CPU_INDEX) where it is reachable, else PyPI's wheel, after a one-line warning
# (PyPI's Linux wheel is the CUDA build, several GB; this project's CPU machines hold a local
# CPU file of it). macOS and Windows: PyPI's wheel, which is the CPU build there.
# STABLEGAN_PRINT_TORCH=1 prints the choice and stops.
set -euo pipefail
VENV="${1:-.venv}"
TORCH_VERSION="${STABLEGAN_TORCH_VERSION:-2.13.0}"
CPU_INDEX="${STABLEGAN_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
cd "$(dirname "$0")/.."

reachable() {
  python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" 2>/dev/null
}

torch_args() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "torch==$TORCH_VERSION"
  elif [ "$(uname -s)" = Linux ] && reachable "$CPU_INDEX/torch/"; then
    echo "torch==$TORCH_VERSION --index-url $CPU_INDEX"
  else
    if [ "$(uname -s)" = Linux ]; then
      echo "stablegan: no NVIDIA GPU and PyTorch's CPU index ($CPU_INDEX) is unreachable: torch from PyPI, whose Linux wheel is the CUDA build (several GB) unless a local file serves it" >&2
    fi
    echo "torch==$TORCH_VERSION"
  fi
}

if [ "${STABLEGAN_PRINT_TORCH:-0}" = "1" ]; then
  torch_args
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  # shellcheck disable=SC2046  # the arguments split on purpose
  "$PY" -m pip install -q $(torch_args)
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
