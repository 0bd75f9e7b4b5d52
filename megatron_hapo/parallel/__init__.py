"""Tensor- and data-parallel numerics: vocab-parallel log-probs/entropy, DP-global statistics.

Losses never touch process groups; this package is where the group-aware math lives.
"""
from .stats import distributed_entropy_stats, distributed_quantile
from .vocab_parallel import vocab_parallel_logprobs_and_entropy

__all__ = ["distributed_entropy_stats", "distributed_quantile", "vocab_parallel_logprobs_and_entropy"]
