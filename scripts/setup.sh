#!/usr/bin/env bash
# One-shot, idempotent set-up on Debian 12: system packages FFCV compiles against, a virtual
# environment in .venv/, a matching torch/torchvision pair, then the project with its dev extra.
# A fast no-op once done (a stamp keyed on the files that define the environment).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

# FFCV 1.0.2 is source-only: it compiles against OpenCV and libjpeg-turbo found with pkg-config.
missing=()
for pkg in libopencv-dev libturbojpeg0-dev pkg-config; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

# The registry's CPU-only torch wheel breaks torchvision (operator torchvision::nms does not
# exist); a matching default-build pair runs fine on CPU. See docs/environment.md.
echo "[setup] installing torch + torchvision"
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
echo "[setup] installing byol-ray and its dependencies (FFCV builds from source, ~15 s)"
$PIP install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, torchvision, ffcv, ray, mlflow; print('[setup] ok: torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__, 'ffcv', ffcv.__version__)"
echo "$want" > "$STAMP"
