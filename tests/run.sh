#!/usr/bin/env bash
# The test command (README, CI): set up the environment, then run the whole suite.
# Where nvcc exists the CUDA kernels are compiled too: for the visible GPU, whose CUDA tests then
# run; without one, for sm_90 + PTX only (the compile is the check). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
flags=(--test)
if command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  flags+=(--cuda)
fi
scripts/setup_env.sh "${flags[@]}"
if [ "${APL_VENV:-}" = system ]; then
  py="${PYTHON:-python3}"
else
  venv="${APL_VENV:-.venv}"
  case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
  # The venv's bin first, so tools installed there (hadolint) are found by the tests.
  export PATH="$venv/bin:$PATH"
  py="$venv/bin/python"
fi
# Style first (configured in pyproject.toml and .clang-format): cheap, and a failure names file and line.
"$py" -m ruff check .
clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu
exec "$py" -m pytest -q tests "$@"
