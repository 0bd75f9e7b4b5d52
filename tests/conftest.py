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


# The slowest files first (seconds alone, measured): under `make test`'s two workers (pytest-xdist, one file
# per worker at a time, in collection order) they start at once instead of ending the run one after the other.
SLOW_FILES = {"test_crash_resume.py": 480, "test_trainer.py": 420, "test_async.py": 400, "test_gpu_path.py": 280,
              "test_moe.py": 150, "test_checkpoint.py": 110, "test_tools.py": 90, "test_multinode.py": 130,
              "test_policy_layouts.py": 60, "test_reward_failures.py": 45}


def pytest_collection_modifyitems(session, config, items):
    def cost(item):
        return -SLOW_FILES.get(item.path.name, 0)

    items.sort(key=cost)  # stable: each file's tests keep their order
