"""What the suite's fork server imports once (conftest: `spawn.preload`): torch, Megatron-Core, the
trainer, vLLM (with the engine's environment set first, as `engine._import_vllm` does) and
transformers. Importing only: nothing here starts a thread, a process group or an engine."""
import transformers  # noqa: F401

import megatron_hapo.trainer  # noqa: F401
from megatron_hapo.rollout import engine

engine._import_vllm()
