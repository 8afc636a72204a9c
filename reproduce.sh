#!/usr/bin/env bash
# Reproduce the paper's Table 1 and Figures 1-3: environment, training grid, report.
# A killed or interrupted run resumes where it stopped when started again (--resume, the default).
#
# Presets (--preset NAME):
#   ./reproduce.sh            paper: the paper's grid (30 epochs, full CIFAR-10) in three forms, on
#                             the best device present -> runs/paper/, paper_figures/
#                               author  the code the paper's author ran: the faithful reproduction
#                               paper   the paper's text (its formulas, lam 0.6, Kaiming), the
#                                       author's code where the text is silent
#                               ma2020  the paper's protocol with the cited work's NCE/NFL
#   ./reproduce.sh --quick    quick: the same three forms scaled down (<= 10 min on 2 CPU cores)
#                             -> runs/quick/, paper_figures/quick/
#   ./reproduce.sh --preset author   the author's code alone -> runs/author/, paper_figures/author/
#   ./reproduce.sh --preset ma2020   the cited work's own protocol -> runs/ma2020/, paper_figures/ma2020/
#   ./reproduce.sh --preset successors   APL's successors (ALFs, ANL, JAL, epsilon-softmax) and its
#                             baselines, each as its own paper trains it, symmetric and asymmetric
#                             noise -> runs/successors/, paper_figures/successors/
#   ./reproduce.sh --quick --preset successors   the same scaled down (<= 10 min on 2 CPU cores)
#                             -> runs/successors_quick/, paper_figures/successors_quick/
#
# Options:
#   --data-dir D    folder holding cifar-10-batches-py (default $APL_DATA_DIR, else data);
#                   downloaded there (checksummed, via torchvision) when missing; in the Docker
#                   image only with --download (--no-download: never)
#   --out DIR       root of runs/ and paper_figures/ (default: this folder)
#   --seeds K       seeds 0..K-1 (default: the preset's)
#   --devices LIST  e.g. cuda:0,cuda:1 or cpu,cpu: one worker per entry (default: every GPU,
#                   else the preset's CPU default)
#   --resume | --fresh   keep finished runs (default) | retrain this grid from scratch
#   --debug         on an error, its traceback too (as APL_DEBUG=1)
#   anything else, or everything after --, goes to `python -m apl grid` (e.g. --epochs 5,
#   --losses ce nce, --set train_subset=500), among them:
#   --engine ray [--address auto] [--gpus-per-run 0.25]   the grid on a Ray cluster
#                   (docs/clusters.md; needs pip install '.[ray]')
#   --lam 0.2,0.4,0.6 --gamma 1,2 --set KEY=V1,V2   sweeps: one run per value (docs/reproducing.md)
# Environment: PYTHON (interpreter to use), APL_VENV (see scripts/setup_env.sh), APL_IN_DOCKER=1
# (set by the Dockerfile: the image's environment is complete, never set it up again).
# Exit status: that of `python -m apl` (its --help lists them); after 1 (some runs failed) or 75
# (runs left to another process) the report of the finished runs is still written.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The exit statuses from their one place, apl/errors.py (standard library only: runs before any set-up).
statuses="$("${PYTHON:-python3}" "$ROOT/apl/errors.py")" ||
  { echo "apl: error: reproduce.sh needs python3 (3.10+) on the PATH, or PYTHON naming one" >&2; exit 2; }
eval "$statuses"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "apl: error: $1 needs a value" >&2; exit "$APL_STATUS_USAGE"; }; }
# Paths given by the caller are relative to where they called from; defaults to the project.
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

preset=paper
quick=0
data_dir="$(absolute "${APL_DATA_DIR:-$ROOT/data}")"
out="$ROOT"
seeds=""
devices=""
mode=--resume
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --preset) need_value "$@"; preset="$2"; shift ;;
    --data-dir) need_value "$@"; data_dir="$(absolute "$2")"; shift ;;
    --out) need_value "$@"; out="$(absolute "$2")"; shift ;;
    --seeds) need_value "$@"; seeds="$2"; shift ;;
    --devices) need_value "$@"; devices="$2"; shift ;;
    --resume) mode=--resume ;;
    --fresh) mode=--fresh ;;
    --debug) export APL_DEBUG=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1") ;;
  esac
  shift
done
# --quick picks the quick variant of the preset (the paper's grid by default).
if [ "$quick" = 1 ]; then
  case "$preset" in
    paper|quick) preset=quick ;;
    successors|successors_quick) preset=successors_quick ;;
    *) echo "apl: error: preset '$preset' has no quick variant (--quick runs paper or successors)" >&2; exit "$APL_STATUS_USAGE" ;;
  esac
fi
case "$preset" in
  paper) figures="$out/paper_figures" ;;
  quick|author|ma2020|successors|successors_quick) figures="$out/paper_figures/$preset" ;;
  *) echo "apl: error: unknown preset '$preset' (use paper, quick, author, ma2020, successors or successors_quick)" >&2
     exit "$APL_STATUS_USAGE" ;;
esac
runs="$out/runs/$preset"
cd "$ROOT"

# The interpreter: $PYTHON, else the project's venv, else python3. Outside Docker, set the
# environment up (scripts/setup_env.sh, idempotent) when that interpreter lacks apl or torch.
venv="${APL_VENV:-$ROOT/.venv}"
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ "$venv" != system ] && [ -x "$venv/bin/python" ]; then
  py="$venv/bin/python"
else
  py=python3
fi
# The project's own environment is checked every time (idempotent, seconds when up to date),
# so a changed kernel source is rebuilt before it trains anything.
if [ "${APL_IN_DOCKER:-0}" != 1 ] && { [ -z "${PYTHON:-}" ] || ! "$py" -c "import apl, torch" 2>/dev/null; }; then
  scripts/setup_env.sh
  if [ "$venv" = system ]; then py="${PYTHON:-python3}"; else py="$venv/bin/python"; fi
fi

start=$(date +%s)
echo "[reproduce] preset $preset: runs -> $runs, tables and figures -> $figures"
grid=("$py" -m apl grid --preset "$preset" --data-dir "$data_dir" --out "$runs" "$mode")
[ -n "$seeds" ] && grid+=(--seeds "$seeds")
[ -n "$devices" ] && grid+=(--devices "$devices")
status=0
"${grid[@]}" "${extra[@]}" || status=$?
# Some runs failed, or were left to another process: still write the report of what finished.
if [ "$status" -ne 0 ] && [[ " $APL_REPORT_ANYWAY " != *" $status "* ]]; then
  exit "$status"
fi
"$py" -m apl report --runs "$runs" --out "$figures"
echo "[reproduce] done in $(( $(date +%s) - start )) s: see $figures/README.md"
exit "$status"
