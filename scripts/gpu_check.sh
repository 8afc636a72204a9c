#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (torch already installed): build the kernels
# for this GPU, then python -m benchmarks.gpu_check runs the CUDA tests, the loss speed table, the
# kernel-launch counts and the training-epoch timings, and writes them to one folder
# (default benchmarks/gpu_check/<gpu>-<UTC time>/). At most about 8 minutes on an H100.
#
#   scripts/gpu_check.sh [--skip-build] [--build-timeout S] [gpu_check options]
#     --skip-build       use the extension as built (no scripts/setup_env.sh run)
#     --build-timeout S  stop the build after S seconds (default 300)
#     gpu_check options: --out DIR, --quick, --steps tests,bench,launches,epochs, --skip-tests,
#       --data-dir DIR, ... (python -m benchmarks.gpu_check --help)
# The build is scripts/setup_env.sh --test --cuda: for this GPU's compute capability (+PTX) when
# TORCH_CUDA_ARCH_LIST is unset, for TORCH_CUDA_ARCH_LIST when set (the Docker image sets its own,
# already built). Exit status: the check's (1 when the build or the tests failed, 2 without a GPU).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
skip_build=0
build_timeout=300
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-build) skip_build=1 ;;
    --build-timeout)
      if [ $# -lt 2 ] || ! [[ "$2" =~ ^[0-9]+$ ]]; then
        echo "gpu_check.sh: --build-timeout needs a whole number of seconds" >&2; exit 2
      fi
      build_timeout="$2"; shift ;;
    -h|--help)
      sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; echo
      skip_build=1; args=(--help); break ;;
    *) args+=("$1") ;;
  esac
  shift
done

py_of_venv() {  # the interpreter scripts/setup_env.sh installs into
  if [ "${APL_VENV:-}" = system ]; then echo "${PYTHON:-python3}"; else echo "${APL_VENV:-$ROOT/.venv}/bin/python"; fi
}
py="$(py_of_venv)"
[ -x "$py" ] || command -v "$py" >/dev/null || py="${PYTHON:-python3}"

# No GPU: skip the build (minutes) and let the check say so; without torch yet, build first.
if [ "$skip_build" = 0 ] && "$py" -c "import torch" 2>/dev/null && \
   ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  skip_build=1
fi

build=()
log=""
if [ "$skip_build" = 0 ]; then
  archs="$(scripts/setup_env.sh --test --print-cuda-archs)"
  log="$(mktemp "${TMPDIR:-/tmp}/apl-gpu-check-build.XXXXXX")"
  echo "[gpu_check] building for TORCH_CUDA_ARCH_LIST=$archs"
  start=$SECONDS
  limit=()
  if command -v timeout >/dev/null; then limit=(timeout "$build_timeout"); fi
  TORCH_CUDA_ARCH_LIST="$archs" "${limit[@]}" scripts/setup_env.sh --test --cuda 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then echo "[gpu_check] the build passed its ${build_timeout} s time box" | tee -a "$log"; fi
  build=(--build-rc "$rc" --build-seconds "$((SECONDS - start))" --build-archs "$archs" --build-log "$log")
  py="$(py_of_venv)"  # setup_env.sh may just have created it
fi

status=0
"$py" -m benchmarks.gpu_check "${build[@]}" "${args[@]}" || status=$?
[ -z "${log:-}" ] || rm -f "$log"  # the check keeps a copy in its folder
exit "$status"
