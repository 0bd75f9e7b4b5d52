import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Multi-rank runs fork from one server that has imported the heavy libraries once (tests/preload.py)
# instead of each starting a fresh interpreter; MEGATRON_HAPO_TEST_SPAWN=1 restores fresh interpreters.
if os.environ.get("MEGATRON_HAPO_TEST_SPAWN") != "1":
    from megatron_hapo import spawn

    spawn.preload(["tests.preload"])
