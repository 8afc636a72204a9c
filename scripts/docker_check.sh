#!/usr/bin/env bash
# Builds the project's Docker image on this machine and runs it: the test suite, a run without
# data (it must fail with one clear message), and ./reproduce.sh --quick on a mounted CIFAR-10
# copy, writing to mounted folders owned by the caller (and, for root, by a second uid too).
# Not in CI: it takes gigabytes of disk and tens of minutes. Needs a running Docker engine, and
# root to make the stand-in base (debootstrap).
#
#   scripts/docker_check.sh [options]
#     --data DIR        folder holding cifar-10-batches-py, mounted read-only at /data
#                       (default /work/shared/data/cifar10 when it exists, else ./data)
#     --out DIR         logs, summary and results (default /tmp/apl-docker-check-<time>)
#     --tag TAG         image to build (default apl-repro:check)
#     --base IMAGE      base image (default: the Dockerfile's BASE_IMAGE, pulled; where it cannot
#                       be pulled, a local stand-in, see below)
#     --release NAME    Debian release of the stand-in (default bookworm: python3 3.11)
#     --rebuild-base    make the stand-in again even if an image of that name exists
#     --no-cache        docker build --no-cache (time a build from scratch)
#     --cifar10 MODE    the Dockerfile's CIFAR10 build argument: skip (default; the data is
#                       mounted) or download (needs the internet at build time)
#     --other-user U:G  when run as root, the uid:gid of the second reproduction (default 1000:1000)
#     --gpus ARG        passed to docker run (e.g. all); without it no GPU is used
#     --skip-tests, --skip-quick   leave a step out
#
# The stand-in base, where NVIDIA's image cannot be pulled: a minimal Debian root file system
# (debootstrap, from this machine's apt sources) imported with `docker import`, holding this
# machine's CUDA toolkit (the folder nvcc runs from, reachable as /usr/local/cuda, so the kernels
# compile as on the real base), its CA certificates, pip configuration and apt sources. No GPU
# driver: the CUDA kernels are compiled and linked, never run. Containers use the host network
# for the build only (package registries); the test and reproduction runs have none.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="${DOCKER:-docker}"

data=""
out=""
tag="apl-repro:check"
base=""
release="bookworm"
rebuild_base=0
no_cache=()
cifar10="skip"
other_user="1000:1000"
gpus=""
run_tests=1
run_quick=1
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "docker_check.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --data) need_value "$@"; data="$2"; shift ;;
    --out) need_value "$@"; out="$2"; shift ;;
    --tag) need_value "$@"; tag="$2"; shift ;;
    --base) need_value "$@"; base="$2"; shift ;;
    --release) need_value "$@"; release="$2"; shift ;;
    --rebuild-base) rebuild_base=1 ;;
    --no-cache) no_cache=(--no-cache) ;;
    --cifar10) need_value "$@"; cifar10="$2"; shift ;;
    --other-user) need_value "$@"; other_user="$2"; shift ;;
    --gpus) need_value "$@"; gpus="$2"; shift ;;
    --skip-tests) run_tests=0 ;;
    --skip-quick) run_quick=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "docker_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$cifar10" in download|skip) ;; *) echo "docker_check.sh: --cifar10 is download or skip" >&2; exit 2 ;; esac
case "$other_user" in [0-9]*:[0-9]*) ;; *) echo "docker_check.sh: --other-user is UID:GID" >&2; exit 2 ;; esac
if [ -z "$data" ]; then
  if [ -d /work/shared/data/cifar10/cifar-10-batches-py ]; then data=/work/shared/data/cifar10; else data="$ROOT/data"; fi
fi
data="$(cd "$data" 2>/dev/null && pwd)" || { echo "docker_check.sh: no data folder $data" >&2; exit 2; }
[ -d "$data/cifar-10-batches-py" ] || { echo "docker_check.sh: $data holds no cifar-10-batches-py" >&2; exit 2; }
out="${out:-/tmp/apl-docker-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.txt"
: > "$summary"

say() { echo "[docker-check] $*" | tee -a "$summary"; }
# step NAME OUTCOME SECONDS: one line per step, collected for the closing summary.
steps=()
step() { steps+=("$(printf '%-26s %-8s %6ss  %s' "$1" "$2" "$3" "${4:-}")"); say "step $1: $2 (${3} s)${4:+ - $4}"; }
now() { date +%s; }

if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "docker_check.sh: no Docker engine answers ('$DOCKER info' fails). Start one, e.g." >&2
  echo "  apt-get install -y docker.io && (dockerd > /tmp/dockerd.log 2>&1 &)" >&2
  exit 1
fi
commit="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
dirty="$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)"
say "$(date -u '+%Y-%m-%d %H:%M UTC'), commit ${commit:0:7} (${dirty} uncommitted paths in the work tree), output $out"
failed=0

# --- 1. The base image ------------------------------------------------------------------------
real_base="$(sed -n 's/^ARG BASE_IMAGE=//p' "$ROOT/Dockerfile" | head -n1)"
standin=0
t0=$(now)
if [ -z "$base" ]; then
  if "$DOCKER" image inspect "$real_base" >/dev/null 2>&1 || \
     timeout 120 "$DOCKER" pull "$real_base" > "$out/pull.log" 2>&1; then
    base="$real_base"
  else
    standin=1
    base="apl-repro-base:standin-$release"
  fi
fi

cuda_root() {  # the toolkit folder the nvcc on PATH (or under CUDA_HOME) runs from
  local nvcc here
  nvcc="$(command -v nvcc || true)"
  [ -n "$nvcc" ] || nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  [ -x "$nvcc" ] || return 1
  # nvcc prints where it runs from (_HERE_), through any wrapper script or symlink.
  here="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
  [ -n "$here" ] || here="$(dirname "$(readlink -f "$nvcc")")"
  readlink -f "$here/.."
}

apt_mirror() {  # the first non-security Debian URI of this machine's apt sources
  local uri
  uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' \
         | tr ' ' '\n' | grep -v -e security -e '^$' | grep -i debian | head -n1 || true)"
  [ -n "$uri" ] || uri="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
         | awk '{print $2}' | grep -v security | head -n1 || true)"
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

make_standin() (  # a subshell, so that its EXIT trap removes the root file system
  cuda="" mirror="" rootfs="" name="" f=""
  cuda="$(cuda_root)" || { echo "docker_check.sh: no nvcc here, cannot make a CUDA stand-in base" >&2; return 1; }
  mirror="$(apt_mirror)"
  command -v debootstrap >/dev/null || { echo "docker_check.sh: needs debootstrap (apt-get install -y debootstrap)" >&2; return 1; }
  rootfs="$(mktemp -d /var/tmp/apl-standin.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  say "stand-in base: Debian $release from $mirror, CUDA from $cuda"
  debootstrap --variant=minbase "$release" "$rootfs" "$mirror" > "$out/debootstrap.log" 2>&1 || {
    tail -n 20 "$out/debootstrap.log" >&2; return 1; }
  # The CUDA toolkit under its own name, and /usr/local/cuda pointing at it, as in NVIDIA's images.
  name="$(basename "$cuda")"
  mkdir -p "$rootfs/usr/local"
  cp -a "$cuda" "$rootfs/usr/local/$name"
  [ "$name" = cuda ] || ln -sfn "$name" "$rootfs/usr/local/cuda"
  # CA certificates: the bundle, and the local CAs so that installing ca-certificates keeps them.
  mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/usr/local/share/ca-certificates"
  cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  # pip's global configuration and the files it names (constraints, certificate bundle).
  for f in /etc/pip.conf /etc/xdg/pip/*; do
    [ -f "$f" ] || continue
    mkdir -p "$rootfs$(dirname "$f")"
    cp -L "$f" "$rootfs$f"
    sed -n 's/^[[:space:]]*[a-z-]*[[:space:]]*=[[:space:]]*\(\/[^[:space:]]*\)[[:space:]]*$/\1/p' "$f" | while read -r ref; do
      if [ -f "$ref" ] && [ ! -e "$rootfs$ref" ]; then mkdir -p "$rootfs$(dirname "$ref")"; cp -L "$ref" "$rootfs$ref"; fi
    done
  done
  # apt: this machine's sources (replacing debootstrap's one-line list) and its Acquire settings.
  if ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list >/dev/null 2>&1; then
    rm -f "$rootfs/etc/apt/sources.list"
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
      if [ -f "$f" ]; then cp "$f" "$rootfs/etc/apt/sources.list.d/"; fi
    done
  fi
  for f in /etc/apt/apt.conf.d/*; do
    if [ -f "$f" ] && grep -q '^Acquire::' "$f"; then cp "$f" "$rootfs/etc/apt/apt.conf.d/"; fi
  done
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  env_args=(--change "ENV PATH=/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                  --change "ENV NVIDIA_VISIBLE_DEVICES=all"
                  --change "ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility"
                  --change "ENV APL_STANDIN_BASE=debian-$release+$name")
  for f in PIP_CERT PIP_DEFAULT_TIMEOUT; do
    if [ -n "${!f:-}" ]; then env_args+=(--change "ENV $f=${!f}"); fi
  done
  tar -C "$rootfs" -c . | "$DOCKER" import "${env_args[@]}" - "$base" > /dev/null
)

if [ "$standin" = 1 ]; then
  if [ "$rebuild_base" = 0 ] && "$DOCKER" image inspect "$base" >/dev/null 2>&1; then
    step "base (stand-in, reused)" ok $(( $(now) - t0 )) "$base; $real_base could not be pulled"
  else
    make_standin  # called plainly: set -e then stops the check at its first failing command
    step "base (stand-in, made)" ok $(( $(now) - t0 )) "$base; $real_base could not be pulled"
  fi
else
  step "base" ok $(( $(now) - t0 )) "$base"
fi

# --- 2. docker build of the project's Dockerfile ----------------------------------------------
t0=$(now)
say "docker build -t $tag (log: $out/build.log)"
if "$DOCKER" build "${no_cache[@]}" --network host --build-arg BASE_IMAGE="$base" --build-arg CIFAR10="$cifar10" \
     --build-arg GIT_COMMIT="$commit" -t "$tag" "$ROOT" > "$out/build.log" 2>&1; then
  build_s=$(( $(now) - t0 ))
  cached="$(grep -c -E 'Using cache|CACHED' "$out/build.log" || true)"
  step "docker build" ok "$build_s" "CIFAR10=$cifar10, $cached steps from cache"
else
  build_s=$(( $(now) - t0 ))
  step "docker build" FAILED "$build_s" "tail of $out/build.log below"
  tail -n 30 "$out/build.log" >&2
  exit 1
fi
size_bytes="$("$DOCKER" image inspect -f '{{.Size}}' "$tag")"
size="$(awk -v b="$size_bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }')"
base_size="$(awk -v b="$("$DOCKER" image inspect -f '{{.Size}}' "$base")" 'BEGIN { printf "%.2f GB", b / 1e9 }')"
say "image $tag: $size (base $base: $base_size); largest layers:"
"$DOCKER" history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$tag" \
  | sort -h -r | head -n 5 | cut -c1-150 | sed 's/^/    /' | tee -a "$summary"

gpu_args=()
if [ -n "$gpus" ]; then gpu_args=(--gpus "$gpus"); fi
run() { "$DOCKER" run --rm --network none "${gpu_args[@]}" "$@"; }

# --- 3. The test suite inside the image -------------------------------------------------------
if [ "$run_tests" = 1 ]; then
  t0=$(now)
  status=0
  run "$tag" pytest -q > "$out/pytest.log" 2>&1 || status=$?
  result="$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$out/pytest.log" | tail -n1 | tr -d '=' | sed 's/^ *//;s/ *$//')"
  if [ "$status" = 0 ]; then step "pytest in the image" ok $(( $(now) - t0 )) "$result"
  else step "pytest in the image" FAILED $(( $(now) - t0 )) "${result:-exit $status}; see $out/pytest.log"; failed=1; fi
fi

# --- 4. No data: one clear message naming the folder and the -v to add ------------------------
if [ "$cifar10" = skip ]; then
  t0=$(now)
  status=0
  run "$tag" ./reproduce.sh --quick > "$out/nodata.log" 2>&1 || status=$?
  errors="$(grep -c '^apl: error:' "$out/nodata.log" || true)"
  if [ "$status" = 3 ] && [ "$errors" = 1 ] && grep -q -- '-v /path/on/host:/data:ro' "$out/nodata.log" \
     && ! grep -q Traceback "$out/nodata.log"; then
    step "run without data" ok $(( $(now) - t0 )) "exit 3 (no data), one message (in $out/nodata.log)"
  else
    step "run without data" FAILED $(( $(now) - t0 )) "exit $status, $errors error lines; see $out/nodata.log"; failed=1
  fi
fi

# check_results DIR UID: Table 1 and Figures 1-3 of both forms exist and UID owns all of DIR.
check_results() {
  local dir="$1" uid="$2" f missing=() foreign
  for f in table1_paper.md table1_ma2020.md figure1_paper.png figure2_paper.png figure3_paper.png \
           figure1_ma2020.png figure2_ma2020.png figure3_ma2020.png README.md; do
    [ -s "$dir/paper_figures/quick/$f" ] || missing+=("$f")
  done
  foreign="$(find "$dir" -mindepth 1 ! -uid "$uid" | wc -l)"
  if [ "${#missing[@]}" -gt 0 ]; then echo "missing ${missing[*]}"; return 1; fi
  if [ "$foreign" != 0 ]; then echo "$foreign paths not owned by uid $uid"; return 1; fi
  echo "$(find "$dir" -type f | wc -l) files, all owned by uid $uid"
}

# --- 5. ./reproduce.sh --quick as the caller, into folders the caller owns --------------------
if [ "$run_quick" = 1 ]; then
  me="$(id -u):$(id -g)"
  res="$out/results"
  mkdir -p "$res/runs" "$res/paper_figures"
  t0=$(now)
  status=0
  run --user "$me" -v "$data:/data:ro" -v "$res/runs:/app/runs" -v "$res/paper_figures:/app/paper_figures" \
      "$tag" ./reproduce.sh --quick -- --no-progress > "$out/quick.log" 2>&1 || status=$?
  secs=$(( $(now) - t0 ))
  if [ "$status" = 0 ] && detail="$(check_results "$res" "$(id -u)")"; then
    step "reproduce --quick" ok "$secs" "--user $me, $detail, in $res"
  else
    step "reproduce --quick" FAILED "$secs" "exit $status; ${detail:-}; see $out/quick.log"; failed=1
  fi

  # Root owns everything anyway, so a shortened run as another uid shows whose the results are.
  if [ "$(id -u)" = 0 ]; then
    uid="${other_user%%:*}"; gid="${other_user##*:}"
    res2="$out/results-uid$uid"
    mkdir -p "$res2/runs" "$res2/paper_figures"
    chown -R "$uid:$gid" "$res2"
    t0=$(now)
    status=0
    run --user "$other_user" -v "$data:/data:ro" -v "$res2/runs:/app/runs" -v "$res2/paper_figures:/app/paper_figures" \
        "$tag" ./reproduce.sh --quick -- --losses ce nce+rce --noise 0.0 0.6 --epochs 1 --no-progress \
        > "$out/quick-uid$uid.log" 2>&1 || status=$?
    detail=""
    # As that uid on the host: read every file, then remove the run records (figures kept to look at).
    if [ "$status" = 0 ] && detail="$(check_results "$res2" "$uid")" && \
       setpriv --reuid "$uid" --regid "$gid" --clear-groups sh -c \
         "find '$res2' -type f -exec cat {} + > /dev/null && rm -rf '$res2/runs' && [ ! -e '$res2/runs' ]"; then
      step "reproduce as uid $uid" ok $(( $(now) - t0 )) "--user $other_user (2 losses, 2 rates, 1 epoch), $detail; uid $uid read them all and removed runs/"
    else
      step "reproduce as uid $uid" FAILED $(( $(now) - t0 )) "exit $status; ${detail:-}; see $out/quick-uid$uid.log"; failed=1
    fi
  fi
fi

# --- Summary ----------------------------------------------------------------------------------
{
  echo
  echo "== docker_check summary ($(date -u '+%Y-%m-%d %H:%M UTC'), commit ${commit:0:7}) =="
  echo "image $tag: $size, built in ${build_s} s on base $base"
  printf '  %s\n' "${steps[@]}"
  if [ "$standin" = 1 ]; then
    echo "The base was a STAND-IN ($base: Debian $release + this machine's CUDA toolkit), not $real_base,"
    echo "which could not be pulled here; the real build's base differs (Ubuntu 24.04, cuDNN, CUDA libraries)."
  fi
  if [ -z "$gpus" ]; then
    echo "--gpus was not exercised: no GPU was given to the containers, so no CUDA kernel ran (they were compiled only)."
  fi
  echo "Logs and results: $out"
} | tee -a "$summary"
exit "$failed"
