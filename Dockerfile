# apl-repro on CUDA 13.0: the fused losses built for Ampere to Blackwell, CIFAR-10 baked in.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t apl-repro .
#   mkdir -p runs paper_figures              # yours, so the results written there are yours
#   docker run --gpus all --user "$(id -u):$(id -g)" \
#       -v "$PWD/runs:/app/runs" -v "$PWD/paper_figures:/app/paper_figures" \
#       apl-repro ./reproduce.sh            # or ./reproduce.sh --quick
#   docker run --gpus all apl-repro pytest  # the test suite, GPU tests included
#
# Build arguments:
#   BASE_IMAGE  the CUDA devel image to build on (default: NVIDIA's CUDA 13.0.1 + cuDNN on
#               Ubuntu 24.04). scripts/docker_check.sh builds this file on a local stand-in
#               where that image cannot be pulled.
#   CIFAR10     download (default): CIFAR-10 is fetched into /data at build time, so the image
#               runs offline. skip: for a build without internet; mount the data at run time,
#               -v /host/folder/holding/cifar-10-batches-py:/data:ro
#   GIT_COMMIT  the commit recorded in each run's manifest (the image has no .git).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# APL_IN_DOCKER: reproduce.sh never sets the environment up again inside the image.
# APL_VENV: scripts/setup_env.sh creates and fills this venv (Ubuntu 24.04's system Python
# refuses pip installs); it comes first on PATH, so `python` and `pytest` are the project's.
# TORCH_CUDA_ARCH_LIST (scripts/setup_env.sh's default list): A100 8.0, RTX 30xx/A10 8.6,
# L4/RTX 40xx 8.9, H100/H200 9.0, B200 10.0, RTX 50xx/RTX PRO 6000 12.0, and 12.0's PTX so newer
# GPUs run it too (the build has no GPU to ask: docker build sees none).
# PIP_NO_CACHE_DIR: pip's cache would keep a second copy of torch and its CUDA wheels in the layer.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    APL_IN_DOCKER=1 \
    APL_VENV=/opt/venv \
    APL_DATA_DIR=/data \
    CUDA_HOME=/usr/local/cuda \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0+PTX" \
    PATH=/opt/venv/bin:${PATH}

# Ubuntu's packages follow the pinned base tag; pinning their versions too would break the
# build at every Ubuntu point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Layers from least to most often changed (torch and tools, data, extension, the rest), via CI's script.
COPY scripts/setup_env.sh scripts/
COPY requirements requirements
RUN scripts/setup_env.sh --test --deps-only

# CIFAR-10 through torchvision, whose download checks the archive's MD5; the archive itself
# is dropped once extracted to /data/cifar-10-batches-py.
ARG CIFAR10=download
RUN case "${CIFAR10}" in \
      download) python -c "from torchvision.datasets import CIFAR10; CIFAR10('/data', train=True, download=True); CIFAR10('/data', train=False, download=True)" \
                && rm -f /data/cifar-10-python.tar.gz ;; \
      skip) mkdir -p /data && echo "CIFAR-10 not in the image (CIFAR10=skip): mount it at run time, -v HOST_DIR:/data:ro" ;; \
      *) echo "CIFAR10 must be download or skip, got '${CIFAR10}'" >&2; exit 2 ;; \
    esac

# pyproject.toml with setup.py: without it pip falls back to a legacy build that lacks torch.
COPY setup.py pyproject.toml ./
COPY csrc csrc
COPY apl apl
RUN scripts/setup_env.sh --test --cuda

COPY . .
# Any uid may run it (docker run --user): caches go to a HOME all can write, results to the mounts.
RUN mkdir -p runs paper_figures /home/apl \
 && chmod 1777 /home/apl
ENV HOME=/home/apl \
    MPLCONFIGDIR=/home/apl/.config/matplotlib \
    TORCH_HOME=/home/apl/.cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/home/apl/.cache/torchinductor \
    TRITON_CACHE_DIR=/home/apl/.cache/triton \
    PYTEST_ADDOPTS="-o cache_dir=/home/apl/.cache/pytest"

# Last, so a new commit rebuilds no layer above.
ARG GIT_COMMIT=unknown
ENV APL_GIT_COMMIT=${GIT_COMMIT}
CMD ["./reproduce.sh"]
