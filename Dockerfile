# megatron_hapo for H100 clusters. The NGC PyTorch image brings torch, CUDA, NCCL, Transformer
# Engine and apex; we add vLLM, megatron-core and this package without replacing that torch.
#
#   docker build -t megatron-hapo .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v $PWD/runs:/workspace/runs megatron-hapo python tools/check_env.py
#
# Pick VLLM_VERSION built against the image's torch release (vLLM pins torch exactly; the NGC
# build is a pre-release of the same version, so vLLM is installed without its torch pin and
# every other requirement is installed under a constraint that keeps the image's torch).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ARG VLLM_VERSION=0.11.2
ARG MCORE_VERSION=0.16.1

WORKDIR /workspace/megatron_hapo
COPY . .

RUN pip freeze | grep -iE '^(torch|transformer.engine|apex)[=@ ]' > /tmp/keep.txt; cat /tmp/keep.txt && \
    pip install --no-deps "vllm==${VLLM_VERSION}" && \
    python tools/requirements_of.py vllm --exclude torch torchvision torchaudio xformers > /tmp/vllm-reqs.txt && \
    pip install -c /tmp/keep.txt -r /tmp/vllm-reqs.txt && \
    pip install -c /tmp/keep.txt "megatron-core==${MCORE_VERSION}" && \
    pip install -c /tmp/keep.txt --no-build-isolation -e ".[gpu]" && \
    python tools/check_env.py

ENV VLLM_USE_V2_MODEL_RUNNER=0 \
    TOKENIZERS_PARALLELISM=false \
    CUDA_DEVICE_MAX_CONNECTIONS=1
