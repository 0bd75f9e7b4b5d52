"""A machine without Transformer Engine, Apex or psutil (the lent GPU, a user's bare node): the shims
that cover each missing library are installed by what is missing, on any device (training/lib_shims),
and each path works: torch AdamW's `step` on resume with the distributed optimizer, the MoE router
without TE's names, a checkpoint save without psutil (which hung in megatron's forked writer)."""
import sys

import torch

from .distributed import run_ranks


def no_psutil_worker(rank, world, root):
    assert "megatron.core" not in sys.modules, "megatron imported before psutil could be blocked"
    sys.modules["psutil"] = None  # `import psutil` raises ImportError from here on, as where it is not installed
    from megatron.core import optimizer as mopt
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.optimizer import distrib_optimizer as dopt
    from megatron.core.transformer.moe import moe_utils

    from megatron_hapo import device as dev
    from megatron_hapo.training import cpu_shims, lib_shims

    seen = {"have_psutil": filesystem_async.HAVE_PSUTIL, "pytorch_adamw": mopt.USING_PYTORCH_OPTIMIZER}
    # the GPU path: megatron_scope on a device with CUDA installs the library shims and nothing of the CPU's
    unpatched = dopt.DistributedOptimizer._set_main_param_and_optimizer_states
    real_is_gpu = dev.is_gpu
    dev.is_gpu = lambda: True
    try:
        with dev.megatron_scope():
            pass
    finally:
        dev.is_gpu = real_is_gpu
    seen["applied_on_gpu_path"] = lib_shims.apply()
    seen["cpu_shims_on_gpu_path"] = cpu_shims._APPLIED
    seen["step_wrapped"] = dopt.DistributedOptimizer._set_main_param_and_optimizer_states is not unpatched
    seen["te_gemm_defined"] = hasattr(moe_utils, "te_general_gemm") and moe_utils.te_general_gemm is None
    seen["rss"] = filesystem_async._process_memory()

    # the paths themselves (on the CPU, with its own shims as well): save (forked writers, no psutil) →
    # resume with the distributed optimizer (torch AdamW's step) → the same next step as a straight run
    from tests.ckpt_job import dist_opt_worker

    from megatron.core import parallel_state as ps

    straight = dist_opt_worker(rank, world, root + "/a", 3, False, [2])
    ps.destroy_model_parallel()
    resumed = dist_opt_worker(rank, world, root + "/a", 3, True, [])
    seen["resume_exact"] = straight["metrics"][2:] == resumed["metrics"] and all(
        torch.equal(resumed["weights"][k], v) for k, v in straight["weights"].items())
    ps.destroy_model_parallel()
    # the MoE router without TE: log-probs of a tiny Qwen3-MoE
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(1, 1)
    hf = hf_model("qwen3_moe", vocab_size=64)
    policy = MegatronPolicy(ModelSpec.from_hf(hf.config), PolicyConfig(micro_batch_size=2), AlgorithmConfig.preset("dapo"))
    policy.load_hf_state_dict(hf.state_dict())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, -1] = False
    logp, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    with torch.no_grad():
        ref = torch.log_softmax(hf.double()(ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    seen["moe_err"] = (logp[:, :-1].double() - ref).abs().max().item()
    return seen


def test_missing_libraries_shimmed_on_any_device(tmp_path):
    """~35 s: one process."""
    seen = run_ranks(1, no_psutil_worker, str(tmp_path), timeout=300, fresh=True)[0]  # megatron not yet imported
    assert seen["have_psutil"] is False and seen["pytorch_adamw"] is True, seen
    assert seen["applied_on_gpu_path"] == ["adamw_step", "moe_te_names", "psutil"], seen
    assert seen["cpu_shims_on_gpu_path"] is False, seen
    assert seen["step_wrapped"] and seen["te_gemm_defined"] and seen["rss"] > 0, seen
    assert seen["resume_exact"], seen
    assert seen["moe_err"] < 1e-4, seen
