#!/usr/bin/env bash
# One-shot, idempotent set-up on Debian 12 / Ubuntu: the system packages FFCV compiles against, then
# byol-ray and every dependency at the exact versions in requirements.lock, used as pip constraints.
# The lock is the one source of truth for versions (torch/torchvision pair included): this script is
# what `make setup`, `make demo`, `make test`, CI and the runtime image's Dockerfile all run.
#
#   bash scripts/setup.sh                      # a virtual environment in $VENV (default .venv) from
#                                              # $PYTHON (default python3); byol-ray editable, dev extra
#   bash scripts/setup.sh --system             # into the interpreter $PYTHON itself, no venv: byol-ray
#                                              # as a regular install, no extras (the Dockerfile)
#   bash scripts/setup.sh --system --deps-only # only pyproject.toml's dependencies (the Dockerfile's
#                                              # cached layer, before the source is copied in)
#
# The venv mode is a fast no-op once done: a stamp keyed on the files that define the environment
# (pyproject.toml, requirements.lock, this script). --system has no stamp: an image build runs it
# once per layer, and pip skips whatever is already installed at the locked version.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=venv
DEPS_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --system) MODE=system ;;
    --deps-only) DEPS_ONLY=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$DEPS_ONLY" = 1 ] && [ "$MODE" != system ]; then
  echo "setup.sh: --deps-only goes with --system" >&2; exit 2
fi

LOCK=requirements.lock
[ -f "$LOCK" ] || { echo "setup.sh: $LOCK is missing (make lock writes it)" >&2; exit 2; }
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-stamp"
want=$(cat pyproject.toml "$LOCK" scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$MODE" = venv ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

# FFCV 1.0.2 is source-only: it compiles against OpenCV and libjpeg-turbo found with pkg-config.
missing=()
for pkg in libopencv-dev libturbojpeg0-dev pkg-config; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
command -v g++ >/dev/null 2>&1 || missing+=(g++)  # FFCV's extension is C++
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$MODE" = venv ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  PYBIN="$VENV/bin/python"
else
  PYBIN=$(command -v "$PY")
fi
PIP="$PYBIN -m pip --disable-pip-version-check"

# Every install is constrained by the lock: exact versions, the matching torch/torchvision pair
# included (the registry's CPU-only torch wheel breaks torchvision at import).
if [ "$DEPS_ONLY" = 1 ]; then
  mapfile -t deps < <("$PYBIN" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
  echo "[setup] installing byol-ray's dependencies into $PYBIN (constraints: $LOCK)"
  $PIP install -q -c "$LOCK" "${deps[@]}"
elif [ "$MODE" = system ]; then
  echo "[setup] installing byol-ray into $PYBIN (constraints: $LOCK; FFCV builds from source, ~15 s)"
  $PIP install -q -c "$LOCK" .
else
  # uv installs what pip would, from the same lock, in a fraction of the time: it downloads in parallel and
  # hard-links wheels from its cache (~/.cache/uv, or $UV_CACHE_DIR) instead of unpacking 7 GB each time.
  # Measured on the 2-core machine, a fresh .venv: pip 151 s; uv 49 s with an empty cache, 37 s with a warm one
  # (the whole script: 52 s).
  # --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (this project's CI machine has it),
  # Python never caches what it compiles on import, and without .pyc files every process compiled torch, Ray
  # and MLflow from source again (pip's `--no-compile` made the suite minutes slower there).
  # uv itself comes from the lock; where it cannot be installed or fails, pip does the same install.
  echo "[setup] installing byol-ray and its dependencies into $VENV (constraints: $LOCK; FFCV builds from source, ~15 s)"
  if ! { $PIP install -q -c "$LOCK" uv && "$VENV/bin/uv" pip install -q -c "$LOCK" --python "$PYBIN" --compile-bytecode -e ".[dev]"; }; then
    echo "[setup] uv was not usable here; installing with pip instead (slower)"
    $PIP install -q -c "$LOCK" -e ".[dev]"
  fi
fi
"$PYBIN" -c "import torch, torchvision, ffcv, ray, mlflow; print('[setup] ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__, 'ffcv', ffcv.__version__)"
if [ "$MODE" = venv ]; then
  echo "$want" > "$STAMP"
fi
