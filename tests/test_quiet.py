"""The console filter (megatron_hapo/quiet.py): the known-harmless third-party warnings are gone by
default and back with verbose; the project's own warnings always show, even with the same words."""
import subprocess
import sys

SCRIPT = r'''
import logging, sys, warnings
from megatron_hapo import quiet
quiet.install(sys.argv[1] == "verbose")
import megatron.core.optimizer  # warns: Transformer Engine and Apex are not installed (on CPU)
warnings.warn_explicit("Transformer Engine and Apex are not installed: ours", UserWarning, "megatron_hapo/fake.py", 1,
                       module="megatron_hapo.fake")
from megatron_hapo.rollout.engine import _import_vllm
_import_vllm()
log = logging.getLogger("vllm.v1.worker.cpu_worker")
log.warning("CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it.")
log.warning("a vLLM warning nobody named")
'''


def run(mode):
    res = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def test_known_warnings_filtered_by_default_and_shown_with_verbose():
    quiet, verbose = run("quiet"), run("verbose")
    assert "Falling back to Torch optimizers" not in quiet and "Falling back to Torch optimizers" in verbose
    assert "after the thread binding" not in quiet and "after the thread binding" in verbose
    for out in (quiet, verbose):
        assert "not installed: ours" in out  # the project's own warning, whatever its words
        assert "a vLLM warning nobody named" in out
