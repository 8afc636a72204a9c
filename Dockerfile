# apl-repro on CUDA 13.0: the fused losses built for Ampere to Blackwell, CIFAR-10 baked in.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t apl-repro .
#   docker run --gpus all -v "$PWD/runs:/app/runs" -v "$PWD/paper_figures:/app/paper_figures" \
#       apl-repro ./reproduce.sh            # or ./reproduce.sh --quick
#   docker run --gpus all apl-repro pytest  # the test suite, GPU tests included
#
# The base tag is one NVIDIA publishes for CUDA 13.0.1 + cuDNN on Ubuntu 24.04; it was not
# pulled where this file was written (no Docker engine there), only linted with hadolint.
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

ARG GIT_COMMIT=unknown
# APL_IN_DOCKER: reproduce.sh never sets the environment up again inside the image.
# APL_VENV: scripts/setup_env.sh creates and fills this venv (Ubuntu 24.04's system Python
# refuses pip installs); it comes first on PATH, so `python` and `pytest` are the project's.
# TORCH_CUDA_ARCH_LIST (scripts/setup_env.sh's default list): A100 8.0, RTX 30xx/A10 8.6,
# L4/RTX 40xx 8.9, H100/H200 9.0, B200 10.0, RTX 50xx/RTX PRO 6000 12.0, and 12.0's PTX so newer
# GPUs run it too (the build has no GPU to ask: docker build sees none).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    APL_IN_DOCKER=1 \
    APL_VENV=/opt/venv \
    APL_DATA_DIR=/data \
    APL_GIT_COMMIT=${GIT_COMMIT} \
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
# The build inputs first, so the torch install and the extension build stay cached while
# tests, docs and scripts change. The same script as the README and CI.
COPY setup.py ./
COPY scripts/setup_env.sh scripts/
COPY csrc csrc
COPY apl apl
RUN scripts/setup_env.sh --test --cuda

# CIFAR-10 through torchvision, whose download checks the archive's MD5; the archive itself
# is dropped once extracted to /data/cifar-10-batches-py.
RUN python -c "from torchvision.datasets import CIFAR10; CIFAR10('/data', train=True, download=True); CIFAR10('/data', train=False, download=True)" \
 && rm -f /data/cifar-10-python.tar.gz

COPY . .
# Results: mount host folders here (see the top of this file).
RUN mkdir -p runs paper_figures
CMD ["./reproduce.sh"]
