"""What the self-test's checks share: the check registry and its tiers, the preflight, the import list,
and the context (a tiny Qwen2-shaped model built in code, a work folder, the policy) with the helpers
several tiers use."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, "tools", "gpu_selftest.py")  # the thin entry point, re-run for isolated checks
sys.path.insert(0, ROOT)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # TE's deterministic attention backward: resume compares exactly

import torch  # noqa: E402

from megatron_hapo import device as dev  # noqa: E402


class Skip(Exception):
    pass


# Tiers: the order checks run in, so that a short lease yields the most important results first:
# the stack, then Transformer Engine, then the training path (no vLLM needed), then the engines, then
# the trainer, then the measurements, then 2-GPU layouts.
STACK, TE, TRAINING, ENGINES, TRAINER, MEASURE, MULTI = range(7)

CHECKS = []

class Check:
    def __init__(self, name, fn, tier, needs, isolated):
        self.name, self.fn, self.tier, self.needs, self.isolated = name, fn, tier, needs, isolated

def check(name, tier, needs=(), isolated=False):
    """needs: importable modules the check cannot run without ("skipped: not installed" when absent);
    isolated: run in a child process of its own (checks that build engines vLLM cannot tear down
    in-process, such as a second sleep-mode engine)."""
    def wrap(fn):
        CHECKS.append(Check(name, fn, tier, tuple(needs), isolated))
        return fn
    return wrap

def installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

# Everything the checks import that is not optional (vLLM and TE are: their checks say "not installed"):
# tools/device_check.sh runs `--check-imports` first, so a missing wheel is named at once, not mid-run.
REQUIRED_IMPORTS = ("numpy", "yaml", "safetensors", "transformers", "megatron.core", "megatron.core.dist_checkpointing",
                    "megatron_hapo.algorithms", "megatron_hapo.parallel", "megatron_hapo.models.hf_config",
                    "megatron_hapo.models.mapping", "megatron_hapo.models.convert", "megatron_hapo.training.parallel",
                    "megatron_hapo.training.batch", "megatron_hapo.training.policy", "megatron_hapo.training.checkpoint",
                    "megatron_hapo.rollout.temperature_processor", "megatron_hapo.rollout.bridge")

def check_imports() -> int:
    """Imports every module in REQUIRED_IMPORTS; prints the first that fails with the module it lacks
    and returns 2, else 0."""
    import importlib

    for name in REQUIRED_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError mostly; a broken native module raises others
            missing = getattr(exc, "name", None) or name
            print(f"missing module {missing!r} (importing {name}: {type(exc).__name__}: {exc})", flush=True)
            return 2
    return 0

def compile_preflight() -> Optional[str]:
    """Why the fused temperature kernel cannot be compiled here, or None: torch.compile builds it with
    Triton on GPU (a C compiler for its launcher, and Python.h) and as C++ on CPU (a C++ compiler, and
    Python.h). Said at once, so the kernel checks report that reason instead of a compiler traceback."""
    import shutil
    import sysconfig

    if dev.is_gpu():
        if not installed("triton"):
            return "Triton is not installed"
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang") or shutil.which("cc")
        what = "C compiler (gcc, clang or $CC) for Triton's launcher"
    else:
        cc = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        what = "C++ compiler (g++, clang++ or $CXX) for the CPU kernel"
    if not cc or not shutil.which(cc.split()[0]):
        return f"no {what} on PATH"
    include = sysconfig.get_paths().get("include", "")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python.h in {include or '(no include path)'}: install the Python development headers"
    return None

PREFLIGHT = {"compile": None}

def need_compiler():
    if PREFLIGHT["compile"]:
        raise Skip(f"skipped: the fused kernel cannot compile here: {PREFLIGHT['compile']}")

def need_gpu(n: int = 1):
    have = torch.cuda.device_count() if dev.is_gpu() else 0
    if have < n:
        raise Skip("skipped: no GPU" if n == 1 or have == 0 else f"skipped: needs {n} GPUs, {have} visible")

def resolve_spec(wanted: str) -> str:
    """The layer spec the checks build: `auto` is TE on a GPU where Transformer Engine is installed,
    else the local spec."""
    if wanted == "auto":
        return "te" if dev.is_gpu() and installed("transformer_engine") else "local"
    if wanted == "te" and not (dev.is_gpu() and installed("transformer_engine")):
        raise SystemExit("--layer-spec te: needs a GPU and transformer_engine installed")
    return wanted

class Ctx:
    """What the checks share: a tiny Qwen2-shaped model built in code, a work folder, the policy."""

    def __init__(self, work: str, layer_spec: str = "local"):
        self.work = work
        self.layer_spec = layer_spec  # resolved: "te" or "local"
        self.model_dir = os.path.join(work, "model")
        self.policy = None
        self.engine = None
        self.spec = None

    def ensure_model(self):
        if self.spec is not None:
            return
        import transformers
        from megatron.core import parallel_state as ps

        from megatron_hapo.training.parallel import init_model_parallel

        if not ps.model_parallel_is_initialized():
            init_model_parallel(1, 1)

        from megatron_hapo.models.hf_config import ModelSpec

        cfg = transformers.AutoConfig.for_model(
            model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(self.model_dir)
        self.hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.spec = ModelSpec.from_hf(cfg)

    def new_policy(self, dtype="float32", distributed_optimizer=False, layer_spec=None, algo="hapo", lr=1e-3,
                   max_tokens=0):
        from megatron_hapo.algorithms import AlgorithmConfig
        from megatron_hapo.training.policy import MegatronPolicy, PolicyConfig

        self.ensure_model()
        policy = MegatronPolicy(self.spec, PolicyConfig(micro_batch_size=2, dtype=dtype, lr=lr, lr_warmup_steps=0,
                                                        use_distributed_optimizer=distributed_optimizer,
                                                        layer_spec=layer_spec or self.layer_spec,
                                                        adam_eps=1e-6, max_tokens_per_micro_batch=max_tokens),
                                AlgorithmConfig.preset(algo))
        policy.load_hf_state_dict(self.hf)
        return policy

    def batch(self, rows=4, width=24, seed=0):
        from megatron_hapo.training.policy import PolicyBatch

        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, self.spec.vocab_size, (rows, width), generator=g)
        mask = torch.zeros(rows, width, dtype=torch.bool)
        mask[:, 6:width - 1] = True
        return PolicyBatch(ids.to(dev.device()), mask.to(dev.device()))

    def train_batch(self, policy, seed=0):
        """A HAPO update batch: old pass, entropy statistics, h_hat, ±1 advantages."""
        from megatron_hapo import algorithms as A
        from megatron_hapo.training.policy import PolicyBatch

        b = self.batch(seed=seed)
        old, ent = policy.compute_logprobs(b)
        stats = A.entropy_stats(ent, b.loss_mask)
        h_hat = A.normalized_entropy(ent, stats, "signed")
        adv = torch.tensor([1.0, -1.0, 0.5, -0.5], device=dev.device())
        return PolicyBatch(b.input_ids, b.loss_mask, advantages=adv, old_logp=old, h_hat=h_hat)

def policy_params(policy):
    return {n: p.detach().float().cpu().clone() for c in policy.chunks for n, p in c.module.named_parameters()}

def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)

def hf_gpt_model(ctx, layer_spec, dtype=torch.float32):
    """A single-rank Megatron GPTModel of `layer_spec` holding the HF weights (strict load)."""
    from megatron_hapo.models.convert import load_state_strict
    from megatron_hapo.models.hf_config import build_gpt_model, transformer_config
    from megatron_hapo.models.mapping import hf_to_megatron

    ctx.ensure_model()
    model = build_gpt_model(ctx.spec, transformer_config(ctx.spec, dtype=dtype), pre_process=True, post_process=True,
                            layer_spec=layer_spec).eval()
    load_state_strict(model, hf_to_megatron(ctx.hf, ctx.spec, layer_spec=layer_spec), f"{layer_spec} spec")
    return model

def spec_logits(ctx, layer_spec, dtype=torch.float32):
    """Megatron GPTModel logits (single rank) for the HF weights, and the token ids used."""
    from megatron_hapo.models.hf_config import attention_mask_for
    from megatron_hapo.training.batch import model_inputs

    model = hf_gpt_model(ctx, layer_spec, dtype)
    ids = ctx.batch(rows=2, width=32, seed=3).input_ids
    pos, mask, _ = model_inputs(ids)
    with torch.no_grad(), dev.megatron_scope():
        out = model(ids, pos, attention_mask_for(layer_spec, mask))
    return out[..., : ctx.spec.vocab_size].float(), ids

def sync_device():
    if dev.is_gpu():
        torch.cuda.synchronize()

def timed(fn, reps: int = 1) -> float:
    """Mean seconds of fn() over reps, with the device synchronised before and after."""
    sync_device()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync_device()
    return (time.perf_counter() - t0) / reps

def processor(tp, device, requests):
    """A HapoTemperatureProcessor called directly (no vLLM), holding one row per `_Request` args tuple."""
    proc = tp.HapoTemperatureProcessor(None, device, False)
    for i, args in enumerate(requests):
        proc.requests[i] = tp._Request(*args)
    proc._rebuild()
    return proc

def moe_setup(ctx):
    """A tiny Qwen3-MoE (8 experts, top-2) saved as an HF folder, and a routing-replay policy holding it."""
    import transformers
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyConfig

    if not ps.model_parallel_is_initialized():
        init_model_parallel(1, 1)
    cfg = transformers.AutoConfig.for_model(
        model_type="qwen3_moe", vocab_size=512, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager").eval()
    path = os.path.join(ctx.work, "moe_model")
    hf.save_pretrained(path)
    policy = MegatronPolicy(ModelSpec.from_hf(cfg), PolicyConfig(micro_batch_size=2, lr=3e-3, lr_warmup_steps=0,
                                                                 routing_replay=True, layer_spec=ctx.layer_spec),
                            AlgorithmConfig.preset("dapo"))
    policy.load_hf_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 20), generator=g)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    mask[:, 4:19] = True
    return hf, policy, ids, mask, path

# fp32 against float64: exact on CPU; TE and cuBLAS run fp32 GEMMs in TF32 on Hopper (as c_hf_logits)
MOE_TOL = 2e-2 if dev.is_gpu() else 2e-5
