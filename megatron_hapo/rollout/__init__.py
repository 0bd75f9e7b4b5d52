"""vLLM rollouts with HAPO's per-token temperature, and trainer → engine weight sync.

Import `megatron_hapo.rollout.engine` lazily: it selects vLLM's V1 runner before importing vLLM.
"""
