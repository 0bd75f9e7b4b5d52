"""Prompt datasets (JSONL / JSON / Parquet, reasoning-gym generators, the built-in addition task),
rendered with the tokenizer's chat template; see datasets.py."""
from .datasets import DataOptions, Example, PromptDataset, PromptSampler, load_prompts

__all__ = ["DataOptions", "Example", "PromptDataset", "PromptSampler", "load_prompts"]
