"""The GPU self-test: proves the GPU path layer by layer in minutes, the first time a GPU is at hand.

    python tools/gpu_selftest.py [--out selftest.json] [--table selftest.txt] [--budget SECONDS]
                                 [--layer-spec auto|te|local] [--skip trainer,multi] [--only NAME,...]
    make gpu-check
    tools/device_check.sh OUT_DIR      # a bare GPU machine: wheels carried along, a 6-minute budget

Checks run in tiers, so that a short lease yields the most important results first and the first
failure names the broken layer: the stack (native imports, collectives on the mixed backend) →
Transformer Engine (HF weights into the TE spec vs transformers and the local spec; a local-spec
checkpoint into the TE model) → the training path, which needs neither vLLM nor TE (placement of
parameters, gradients and batches; vocab-parallel log-probs/entropy at V = 151,936 vs float64; a bf16
HAPO step with the distributed optimizer; packed vs padded micro-batches; save/resume; the weights
walk on the device; the temperature processor free of device syncs; a MoE step) → the engines (an
engine built after the policy, records vs recomputation, weight sync, sleep/wake; the MoE engine with
routing replay and an engine with CUDA graphs each in a process of its own) → the trainer and its
resume → measurements (the temperature kernel and eager path in GB/s, the update's MFU on a 0.5 B
model) → with 2+ GPUs, parallel layouts against one GPU.

A check whose library is not installed (vLLM, Transformer Engine) says "skipped: not installed";
without CUDA the same code runs on the CPU wherever a check has a CPU meaning (local spec, fp32) and
says "skipped: ..." for the rest: a check never reports a pass it did not measure. Output: one table
(check, status, seconds, peak GPU memory, figure) and a JSON file; exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _params(policy):
    return {n: p.detach().float().cpu().clone() for c in policy.chunks for n, p in c.module.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- the checks, in stack order ------------------------------------------------------------------

@check("stack and native imports", STACK)
def c_stack(ctx):
    import importlib

    import megatron.core

    versions = [f"torch {torch.__version__} (CUDA {torch.version.cuda})", f"mcore {megatron.core.__version__}"]
    for label, module in (("vLLM", "vllm"), ("TE", "transformer_engine"), ("transformers", "transformers")):
        if installed(module):
            versions.append(f"{label} {getattr(importlib.import_module(module), '__version__', '?')}")
        else:
            versions.append(f"{label} not installed")
    figure = ", ".join(versions) + f"; layer spec {ctx.layer_spec}"
    if not dev.is_gpu():
        return figure + "; native GPU modules skipped: no GPU", True
    natives = [m for m, owner in (("vllm._C", "vllm"), ("vllm.cumem_allocator", "vllm"),
                                  ("transformer_engine.pytorch", "transformer_engine")) if installed(owner)]
    for mod in natives:
        importlib.import_module(mod)
    figure += f"; native modules loaded: {', '.join(natives) or 'none installed'}; GPU {torch.cuda.get_device_name()}"
    return figure, True


@check("collectives on the mixed backend", STACK)
def c_collectives(ctx):
    import torch.distributed as dist

    from megatron_hapo.training.parallel import control_group, init_model_parallel

    init_model_parallel(1, 1)
    backend = str(dist.get_backend())
    cpu = torch.ones(4)
    dist.all_reduce(cpu)
    dist.all_reduce(cpu, group=control_group())
    figure = f"backend {backend}: cpu all_reduce ok"
    ok = cpu.sum().item() == 4 * dist.get_world_size() ** 2
    if dev.is_gpu():
        gpu = torch.ones(4, device=dev.device())
        dist.all_reduce(gpu)
        ok = ok and gpu.sum().item() == 4 * dist.get_world_size() and "nccl" in backend and "gloo" in backend
        figure += f", cuda all_reduce ok on {gpu.device}"
    return figure, ok


@check("parameters, gradients and batches on the rank's device", TRAINING)
def c_placement(ctx):
    policy = ctx.policy = ctx.new_policy()
    want = dev.device()
    tb = ctx.train_batch(policy)
    seen = {}
    original = policy.batcher.split

    def spy(batch):  # what the micro-batches hold, as the schedule receives them
        out = original(batch)
        seen.update({k: v.device for k, v in out[0].items() if isinstance(v, torch.Tensor)})
        seen["input_ids"] = out[0]["batch"].input_ids.device
        return out

    policy.batcher.split = spy
    try:
        m = policy.train_step(tb)
    finally:
        policy.batcher.split = original
    wrong = [n for c in policy.chunks for n, p in c.module.named_parameters() if p.device != want]
    wrong += [f"grad {n}" for c in policy.chunks for n, p in c.module.named_parameters()
              if getattr(p, "main_grad", None) is not None and p.main_grad.device != want]
    # `rows` (which rows of the batch a micro-batch holds) is created on the host on purpose: it indexes
    # host-side bookkeeping and goes to the device only where a device tensor is indexed with it
    wrong += [f"batch {k}" for k, d in seen.items() if d != want and k != "rows"]
    figure = f"{sum(1 for c in policy.chunks for _ in c.module.parameters())} parameters, batch on {want}; loss {m['loss']:.4f}"
    if wrong:
        figure += f"; elsewhere: {wrong[:4]}"
    return figure, not wrong and math.isfinite(m["loss"])


def _hf_gpt_model(ctx, layer_spec, dtype=torch.float32):
    """A single-rank Megatron GPTModel of `layer_spec` holding the HF weights (strict load)."""
    from megatron_hapo.models.convert import load_state_strict
    from megatron_hapo.models.hf_config import build_gpt_model, transformer_config
    from megatron_hapo.models.mapping import hf_to_megatron

    ctx.ensure_model()
    model = build_gpt_model(ctx.spec, transformer_config(ctx.spec, dtype=dtype), pre_process=True, post_process=True,
                            layer_spec=layer_spec).eval()
    load_state_strict(model, hf_to_megatron(ctx.hf, ctx.spec, layer_spec=layer_spec), f"{layer_spec} spec")
    return model


def _logits(ctx, layer_spec, dtype=torch.float32):
    """Megatron GPTModel logits (single rank) for the HF weights, and the token ids used."""
    from megatron_hapo.models.hf_config import attention_mask_for
    from megatron_hapo.training.batch import model_inputs

    model = _hf_gpt_model(ctx, layer_spec, dtype)
    ids = ctx.batch(rows=2, width=32, seed=3).input_ids
    pos, mask, _ = model_inputs(ids)
    with torch.no_grad(), dev.megatron_scope():
        out = model(ids, pos, attention_mask_for(layer_spec, mask))
    return out[..., : ctx.spec.vocab_size].float(), ids


@check("HF weights → Megatron (TE spec): logits vs transformers and vs the local spec", TE)
def c_hf_logits(ctx):
    import transformers

    ctx.ensure_model()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=torch.float32).to(dev.device()).eval()
    local, ids = _logits(ctx, "local")
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    d_local = (local - ref).abs().max().item()
    # fp32 everywhere; on GPU matmuls may run in TF32 (TE), hence the looser bound there
    tol = 2e-2 if dev.is_gpu() else 1e-4
    figure = f"local spec vs transformers max|Δlogit| {d_local:.2e} (tol {tol:g})"
    ok = d_local < tol
    if not dev.is_gpu():
        return figure + "; TE spec skipped: no GPU", ok
    if not installed("transformer_engine"):
        return figure + "; TE spec skipped: not installed", ok
    te, _ = _logits(ctx, "te")
    d_te, d_te_local = (te - ref).abs().max().item(), (te - local).abs().max().item()
    te_bf16, _ = _logits(ctx, "te", torch.bfloat16)
    rel_bf16 = ((te_bf16 - ref).abs().max() / ref.abs().max()).item()
    figure += f"; TE vs transformers {d_te:.2e}, TE vs local {d_te_local:.2e}; TE bf16 rel {rel_bf16:.2e} (tol 5e-2)"
    return figure, ok and d_te < tol and d_te_local < tol and rel_bf16 < 5e-2


@check("vocab-parallel log-probs/entropy at V = 151,936 vs float64; GB/s", TRAINING)
def c_vocab(ctx):
    from megatron_hapo.parallel import vocab_parallel_logprobs_and_entropy

    vocab, tokens = 151_936, (4096 if dev.is_gpu() else 64)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if dev.is_gpu() else torch.float32
    logits = (3 * torch.randn(tokens, vocab, generator=g)).to(dev.device(), dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(dev.device())
    temps = (0.8 + 0.4 * torch.rand(tokens, generator=g)).to(dev.device())
    logp, ent = vocab_parallel_logprobs_and_entropy(logits, labels, temps, chunk_size=1024)
    ref = torch.log_softmax(logits.double() / temps.double()[:, None], -1)
    ref_logp = ref.gather(-1, labels[:, None]).squeeze(-1)
    ref_ent = -(ref.exp() * ref).sum(-1)
    d = max((logp.double() - ref_logp).abs().max().item(), (ent.double() - ref_ent).abs().max().item())
    t_ours = _timed(lambda: vocab_parallel_logprobs_and_entropy(logits, labels, temps, chunk_size=1024), reps=5)
    t_copy = _timed(logits.clone, reps=5)
    nbytes = logits.numel() * logits.element_size()
    return (f"{tokens} tokens {str(dtype)[6:]}: max|Δ| {d:.2e} vs fp64 (tol 1e-3); {t_ours * 1e3:.1f} ms = "
            f"{t_ours / t_copy:.1f}× a device copy of the {nbytes / 2**20:.0f} MiB logits; reads the logits at "
            f"{nbytes / t_ours / 1e9:.0f} GB/s (copy: {2 * nbytes / t_copy / 1e9:.0f} GB/s read + write)"), d < 1e-3


def _sync():
    if dev.is_gpu():
        torch.cuda.synchronize()


def _timed(fn, reps: int = 1) -> float:
    """Mean seconds of fn() over reps, with the device synchronised before and after."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps


def _processor(tp, device, requests):
    """A HapoTemperatureProcessor called directly (no vLLM), holding one row per `_Request` args tuple."""
    proc = tp.HapoTemperatureProcessor(None, device, False)
    for i, args in enumerate(requests):
        proc.requests[i] = tp._Request(*args)
    proc._rebuild()
    return proc


@check("HAPO train step, bf16, distributed optimizer", TRAINING)
def c_train_bf16(ctx):
    dtype = "bfloat16" if dev.is_gpu() else "float32"
    policy = ctx.new_policy(dtype=dtype, distributed_optimizer=True)
    before = _params(policy)
    m = policy.train_step(ctx.train_batch(policy))
    moved = _max_diff(_params(policy), before)
    ok = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and not m["skipped"] and moved > 0
    note = "" if dev.is_gpu() else " (fp32 on CPU)"
    return f"{dtype}{note}: loss {m['loss']:.4f}, grad norm {m['grad_norm']:.3f}, max|Δw| {moved:.2e}", ok


@check("packed micro-batches (THD on the TE spec) vs padded rows: log-probs and one update", TRAINING)
def c_packed(ctx):
    from megatron_hapo.training.policy import PolicyBatch

    ctx.ensure_model()
    b = ctx.batch(rows=4, width=40, seed=4)
    mask = b.loss_mask.clone()
    for i, n in enumerate((40, 13, 27, 9)):  # lengths that differ, so the padded rows waste tokens
        mask[i, n - 1:] = False
    b = PolicyBatch(b.input_ids, mask)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], device=dev.device())
    out = {}
    for name, budget in (("padded", 0), ("packed", 48)):
        policy = ctx.new_policy(algo="dapo", max_tokens=budget)
        old, _ = policy.compute_logprobs(b)
        m = policy.train_step(PolicyBatch(b.input_ids, mask, advantages=adv, old_logp=old))
        out[name] = (old, m, _params(policy), policy.take_token_counts())
    d_logp = (out["packed"][0] - out["padded"][0]).abs().max().item()
    d_w = _max_diff(out["packed"][2], out["padded"][2])
    d_g = abs(out["packed"][1]["grad_norm"] - out["padded"][1]["grad_norm"])
    pad = {k: v[3]["tokens_computed"] / v[3]["tokens_real"] for k, v in out.items()}
    tol = 5e-3 if dev.is_gpu() else 1e-5  # TE's varlen kernels (TF32 on GPU) vs its padded path
    spec = "TE spec, THD" if ctx.layer_spec == "te" else "local spec, block-diagonal mask"  # the spec built
    return (f"{spec}: max|Δlogp| {d_logp:.2e}, max|Δw| after a step {d_w:.2e}, |Δ grad norm| {d_g:.1e} (tol {tol:g}); "
            f"padding factor {pad['padded']:.2f} → {pad['packed']:.2f}"), d_logp < tol and d_w < tol and d_g < tol * 10


@check("save → resume → one step equals a straight run", TRAINING)
def c_resume(ctx):
    from megatron_hapo.training.checkpoint import load_checkpoint, save_checkpoint

    root = os.path.join(ctx.work, "ckpt")
    a = ctx.new_policy(distributed_optimizer=True)
    a.train_step(ctx.train_batch(a, seed=1))
    save_checkpoint(root, 1, a)
    m_a = a.train_step(ctx.train_batch(a, seed=2))
    straight = _params(a)
    b = ctx.new_policy(distributed_optimizer=True)
    load_checkpoint(os.path.join(root, "iter_0000001"), b)
    m_b = b.train_step(ctx.train_batch(b, seed=2))
    d = _max_diff(_params(b), straight)
    d_g = abs(m_b["grad_norm"] - m_a["grad_norm"])
    tol = 1e-6 if dev.is_gpu() else 0.0  # bit-exact on CPU; GPU kernels may reorder sums
    return f"max|Δw| resumed vs straight {d:.2e}, |Δ grad norm| {d_g:.1e} (tol {tol:g})", d <= tol and d_g <= tol * 100


@check("a local-spec (CPU-converted) checkpoint loads into the TE model", TE, needs=("transformer_engine",))
def c_local_into_te(ctx):
    need_gpu()
    from megatron.core import dist_checkpointing

    from megatron_hapo.training.checkpoint import load_model_checkpoint

    model = _hf_gpt_model(ctx, "local")
    path = os.path.join(ctx.work, "local_ckpt")
    os.makedirs(path)
    with dev.megatron_scope():
        dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
    te_policy = ctx.new_policy(layer_spec="te")
    with torch.no_grad():
        for c in te_policy.chunks:
            for p in c.module.parameters():
                p.zero_()
    load_model_checkpoint(path, te_policy)
    restored = te_policy.hf_state_dict()
    d = max((restored[k].float() - ctx.hf[k].float()).abs().max().item() for k in restored)
    return f"TE policy from a local-spec checkpoint: max|Δw| vs HF {d:.2e}", d == 0.0


def _moe_setup(ctx):
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


@check("MoE (tiny Qwen3-MoE, EP 1; TE grouped experts with the TE spec): log-probs vs transformers, weights round "
       "trip, a step", TRAINING)
def c_moe(ctx):
    from megatron_hapo.models.mapping import unfuse_hf_experts
    from megatron_hapo.training.policy import PolicyBatch

    hf, policy, ids, mask, _ = _moe_setup(ctx)
    want = unfuse_hf_experts(hf.state_dict())
    names = [n for n in policy.chunks[0].module.state_dict() if ".experts." in n and not n.endswith("_extra_state")]
    back = policy.hf_state_dict()
    round_trip = set(back) == set(want) and all(torch.equal(back[k].cpu(), want[k]) for k in want)
    lp, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    with torch.no_grad():
        ref = torch.log_softmax(hf.double()(ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    hf_err = (lp[:, :-1].cpu().double() - ref).abs()[mask[:, :-1]].max().item()
    m = policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]), old_logp=lp))
    ok = hf_err < MOE_TOL and round_trip and math.isfinite(m["loss"]) and not m["skipped"]
    return (f"{policy.layer_spec} spec, expert names {names[:1]}: max|Δ log p| vs transformers float64 {hf_err:.1e} "
            f"(tol {MOE_TOL:g}); round trip exact: {round_trip}; step loss {m['loss']:.4f}, grad norm {m['grad_norm']:.3f}"), ok


@check("MoE engine: sync after a step, routing replay of the engine's recorded experts", ENGINES, needs=("vllm",),
       isolated=True)
def c_moe_engine(ctx):
    # in a process of its own: vLLM creates its expert-parallel group only for a MoE model's first engine
    from megatron_hapo.algorithms import logprob_mismatch
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine
    from megatron_hapo.training.policy import PolicyBatch

    _, policy, ids, mask, path = _moe_setup(ctx)
    lp, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    engine = RolloutEngine(path, max_model_len=64, kv_cache_memory_bytes=32 * 2**20, gpu_memory_utilization=0.15,
                           seed=0, record_routing=True)
    policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]), old_logp=lp))
    sync_policy_to_engine(policy, engine)
    trainer, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    mm = logprob_mismatch(torch.tensor(engine.score(ids.tolist()), device=trainer.device), trainer[:, :-1], mask[:, :-1])
    res = engine.generate([ids[0, :6].tolist()], 1, SamplingConfig(max_tokens=6), None, [0])[0][0]
    seq = ids[0, :6].tolist() + res.token_ids
    rows = torch.tensor([seq + [0]])
    rmask = torch.zeros_like(rows, dtype=torch.bool)
    rmask[0, 5:len(seq) - 1] = True
    routing = torch.full(rows.shape + (2, 2), -1, dtype=torch.int16)
    routing[0, :len(seq) - 1] = torch.from_numpy(res.routing).permute(1, 0, 2)
    policy.compute_logprobs(PolicyBatch(rows, rmask, routing=routing))
    replay_mismatch = policy.take_routing_mismatch()
    engine.close()
    sync_tol = 1e-2 if dev.is_gpu() else 1e-4
    # the share of (token, layer) pairs whose experts the trainer's router would choose otherwise: 0 on CPU
    # (same fp32 arithmetic); on GPU near-ties may flip under TF32, hence a small share, reported as a figure
    replay_tol = 0.02 if dev.is_gpu() else 0.0
    ok = mm["logp_mismatch_max"] < sync_tol and replay_mismatch is not None and replay_mismatch <= replay_tol
    replay = "no replayed pass" if replay_mismatch is None else f"{replay_mismatch:.3%}"
    return (f"engine vs trainer after a step and sync {mm['logp_mismatch_max']:.1e} (tol {sync_tol:g}); routing replay: "
            f"trainer's own routing differs from the engine's recorded on {replay} of (token, layer) pairs "
            f"(tol {replay_tol:.0%})"), ok


@check("engine built after the policy keeps the rank's current device", ENGINES, needs=("vllm",))
def c_engine_device(ctx):
    from megatron_hapo.rollout.engine import RolloutEngine

    ctx.ensure_model()
    before = torch.cuda.current_device() if dev.is_gpu() else "cpu"
    ctx.engine = RolloutEngine(ctx.model_dir, max_model_len=128, kv_cache_memory_bytes=64 * 2**20, seed=0,
                               dtype="float32", gpu_memory_utilization=0.3, enable_sleep_mode=dev.is_gpu())
    after = torch.cuda.current_device() if dev.is_gpu() else "cpu"
    executor = ctx.engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    return f"executor {executor}; current device {before} → {after}", before == after and executor == "external_launcher"


@check("temperature processor in the engine: records vs recomputation, tokens/s", ENGINES, needs=("vllm",))
def c_temperature(ctx):
    from vllm import SamplingParams, TokensPrompt

    from megatron_hapo import algorithms as A
    from megatron_hapo.rollout.engine import SamplingConfig
    from megatron_hapo.training.policy import PolicyBatch

    if ctx.engine is None:
        raise Skip("skipped: no engine (the engine check failed)")
    policy = ctx.new_policy()  # the engine's weights: the HF folder's
    stats = A.EntropyStats(q=math.log(4.0), sigma=0.5, z_pos=2.0, z_neg=-3.0)
    prompts = [[1] + list(range(5 + i, 15 + i)) for i in range(8)]
    sampling = SamplingConfig(max_tokens=24, adaptive=True, tau=0.3, stop_token_ids=())
    ctx.engine.generate(prompts[:2], 2, sampling, stats, seeds=[0, 1])  # warm-up, not timed
    t0 = time.perf_counter()
    out = ctx.engine.generate(prompts, 4, sampling, stats, seeds=list(range(len(prompts))))
    t_hapo = time.perf_counter() - t0
    responses = [r for group in out for r in group]
    rows = [prompts[r.prompt_index] + r.token_ids for r in responses]
    width = max(map(len, rows)) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    temps = torch.ones(len(rows), width)
    rec_lp = torch.zeros(len(rows), width)
    rec_h = torch.zeros(len(rows), width)
    for i, (row, r) in enumerate(zip(rows, responses)):
        p = len(prompts[r.prompt_index])
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, p - 1:p - 1 + r.length] = True
        temps[i, p - 1:p - 1 + r.length] = torch.tensor(r.temperatures)
        rec_lp[i, p - 1:p - 1 + r.length] = torch.tensor(r.logprobs)
        rec_h[i, p - 1:p - 1 + r.length] = torch.tensor(r.entropies)
    batch = PolicyBatch(ids, mask)
    lp_t, _ = policy.compute_logprobs(batch, temperature=temps)
    _, h1 = policy.compute_logprobs(batch)
    t_recomputed = A.adaptive_temperature(h1, stats, 1.0, 0.3, "signed")
    d_lp = (lp_t - rec_lp)[mask].abs().max().item()
    d_t = (t_recomputed - temps)[mask].abs().max().item()
    d_h = (h1 - rec_h)[mask].abs().max().item()
    tokens = sum(r.length for r in responses)
    params = [SamplingParams(n=1, temperature=1.0, max_tokens=24, seed=i, detokenize=False) for i in range(len(prompts) * 4)]
    t0 = time.perf_counter()
    plain = ctx.engine.llm.generate([TokensPrompt(prompt_token_ids=prompts[i // 4]) for i in range(len(params))], params,
                                    use_tqdm=False)
    t_plain = time.perf_counter() - t0
    plain_tokens = sum(len(o.outputs[0].token_ids) for o in plain)
    tol = 5e-3 if dev.is_gpu() else 2e-4
    return (f"{tokens} tokens: max|ΔT| {d_t:.1e}, |ΔH| {d_h:.1e}, |Δlog p_T| {d_lp:.1e} (tol {tol:g}); "
            f"{tokens / t_hapo:.0f} tok/s with the processor vs {plain_tokens / t_plain:.0f} for plain vLLM sampling "
            f"(same engine, requests without HAPO arguments)"), max(d_t, d_h, d_lp) < tol


@check("temperature processor: no device-to-host sync in a decoding step (fused kernel and eager path)", TRAINING)
def c_processor_sync(ctx):
    from megatron_hapo import algorithms as A
    from megatron_hapo.rollout import temperature_processor as tp

    need_compiler()
    device = dev.device()
    stats = A.EntropyStats(q=math.log(4.0), sigma=0.5, z_pos=2.0, z_neg=-3.0)
    vocab = 151936 if dev.is_gpu() else 32768  # Qwen's vocabulary on GPU; smaller on CPU (the suite runs this)
    logits = torch.randn(8, vocab, device=device)
    logits[:, -100:] = float("-inf")  # masked tokens: the −inf path too
    saved, results = tp._FUSED["wanted"], {}
    try:
        for path in ("fused", "eager"):
            tp.use_fused(path == "fused")
            # two groups of settings: the per-group path as well
            proc = _processor(tp, device, [(f"sync-{path}-{i}", stats, 1.0, 0.1 if i % 2 else 0.2, "signed", [0] * i)
                                           for i in range(6)])
            proc.apply(logits.clone())  # warm-up (the fused kernel compiles here)
            if dev.is_gpu():
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # any implicit device-to-host sync raises
            try:
                out = proc.apply(logits.clone())
            finally:
                if dev.is_gpu():
                    torch.cuda.set_sync_debug_mode("default")
            rec = tp.RECORDER.pop({f"sync-{path}-{i}" for i in range(6)})
            values = torch.tensor([rec[f"sync-{path}-{i}"][i] for i in range(6)], dtype=torch.float64)
            results[path] = (out, values)
    finally:
        tp.use_fused(saved)
    finite = all(bool(torch.isfinite(out[:6, :-100]).all()) and bool(torch.isfinite(v).all()) for out, v in results.values())
    diff = (results["fused"][1] - results["eager"][1]).abs().max().item()
    built = tp.fused_failure() is None and device.type in tp._FUSED["proven"]
    mode = "under torch.cuda sync debug mode 'error'" if dev.is_gpu() else "on CPU (no device to wait for)"
    return (f"6 rows × {vocab:,} logits, −inf tail: no sync {mode}, both paths; records finite: {finite}; fused kernel "
            f"built on {device.type}: {built} ({tp.fused_failure() or 'ok'}); fused vs eager records max |Δ| {diff:.1e} "
            f"(tol 1e-3)"), finite and built and diff < 1e-3


@check("weight sync on the device: no host copy, time vs a device copy, mismatch after sync", ENGINES, needs=("vllm",))
def c_weight_sync(ctx):
    from megatron_hapo.algorithms import logprob_mismatch
    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine

    if ctx.engine is None:
        raise Skip("skipped: no engine (the engine check failed)")
    policy = ctx.policy or ctx.new_policy()
    for seed in (5, 6):
        policy.train_step(ctx.train_batch(policy, seed=seed))
    off_device = [n for n, t in policy.hf_weights() if t.device != dev.device()]
    sync = sync_policy_to_engine(policy, ctx.engine)
    flat = [t for _, t in policy.hf_weights()]
    t_copy = _timed(lambda: [t.clone() for t in flat])
    b = ctx.batch(seed=9)
    trainer, _ = policy.compute_logprobs(b)
    eng = torch.tensor(ctx.engine.score(b.input_ids.tolist()), device=trainer.device)
    mm = logprob_mismatch(eng, trainer[:, :-1], b.loss_mask[:, :-1])
    tol = 1e-2 if dev.is_gpu() else 1e-4
    figure = (f"{sync['weight_sync_bytes'] / 2**20:.1f} MiB in {sync['weight_sync_s'] * 1e3:.0f} ms "
              f"({sync['weight_sync_s'] / max(t_copy, 1e-9):.0f}× a device copy); mismatch max {mm['logp_mismatch_max']:.1e} "
              f"(tol {tol:g})")
    if off_device:
        figure += f"; off the device: {off_device[:3]}"
    return figure, not off_device and mm["logp_mismatch_max"] < tol


@check("three sleep/wake cycles without memory growth", ENGINES, needs=("vllm",))
def c_sleep(ctx):
    need_gpu()
    if ctx.engine is None:
        raise Skip("skipped: no engine (the engine check failed)")
    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine

    policy = ctx.policy or ctx.new_policy()
    free = []
    for _ in range(3):
        ctx.engine.sleep()
        dev.free_cached_memory()
        slept = torch.cuda.mem_get_info()[0]
        ctx.engine.wake_up_weights()
        sync_policy_to_engine(policy, ctx.engine)
        ctx.engine.wake_up_kv_cache()
        dev.free_cached_memory()
        free.append((slept, torch.cuda.mem_get_info()[0]))
    growth = (free[0][1] - free[-1][1]) / 2**20
    released = (free[0][0] - free[0][1]) / 2**20
    return f"sleeping frees {released:.0f} MiB; free memory change over 3 cycles {growth:+.0f} MiB (tol 256)", \
        growth < 256 and released > 0


@check("engine with CUDA graphs (enforce_eager=False): records equal the eager engine's, tokens/s", ENGINES,
       needs=("vllm",), isolated=True)
def c_cuda_graphs(ctx):
    # in a process of its own: the graphs engine is a sleep-mode engine, and vLLM's memory pool serves one
    # such engine per process
    from megatron_hapo import algorithms as A
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig

    need_gpu()
    ctx.ensure_model()
    stats = A.EntropyStats(q=math.log(4.0), sigma=0.5, z_pos=2.0, z_neg=-3.0)
    prompts = [[1] + list(range(5 + i, 15 + i)) for i in range(8)]
    sampling = SamplingConfig(max_tokens=32, adaptive=True, tau=0.3, stop_token_ids=())
    common = dict(max_model_len=128, kv_cache_memory_bytes=64 * 2**20, seed=0, dtype="float32", gpu_memory_utilization=0.2)
    eager_engine = RolloutEngine(ctx.model_dir, enforce_eager=True, **common)
    eager_engine.generate(prompts[:2], 2, sampling, stats, seeds=[0, 1])  # warm-up
    eager_t0 = time.perf_counter()
    eager = eager_engine.generate(prompts, 4, sampling, stats, seeds=list(range(8)))
    eager_s = time.perf_counter() - eager_t0
    eager_engine.close()
    graphs = RolloutEngine(ctx.model_dir, enable_sleep_mode=True, enforce_eager=False, **common)
    graphs.generate(prompts[:2], 2, sampling, stats, seeds=[0, 1])  # warm-up (captures)
    t0 = time.perf_counter()
    out = graphs.generate(prompts, 4, sampling, stats, seeds=list(range(8)))
    graphs_s = time.perf_counter() - t0
    graphs.sleep()
    graphs.wake_up_weights()
    graphs.wake_up_kv_cache()
    again = graphs.generate(prompts, 4, sampling, stats, seeds=list(range(8)))  # after a sleep/wake cycle
    graphs.close()
    pairs = [(a, b) for ga, gb in zip(eager, out) for a, b in zip(ga, gb)]
    same_tokens = sum(a.token_ids == b.token_ids for a, b in pairs) / len(pairs)
    d_lp = max((abs(x - y) for a, b in pairs if a.token_ids == b.token_ids for x, y in zip(a.logprobs, b.logprobs)),
               default=0.0)
    stable = all(a.token_ids == b.token_ids for ga, gb in zip(out, again) for a, b in zip(ga, gb))
    tokens = sum(r.length for g in out for r in g)
    return (f"identical responses {same_tokens:.0%}, max|Δlog p| on them {d_lp:.1e}; same after sleep/wake: {stable}; "
            f"{tokens / graphs_s:.0f} tok/s with graphs vs {tokens / eager_s:.0f} eager"), \
        same_tokens >= 0.9 and d_lp < 5e-3 and stable


@check("trainer: 2 steps, then resume for a third", TRAINER, needs=("vllm",))
def c_trainer(ctx):
    run_dir = os.path.join(ctx.work, "run")
    base = [sys.executable, "-m", "megatron_hapo.train", f"train.run_dir={run_dir}", "log.progress=off",
            "rollout.max_response_tokens=6", "eval.at_end=false", "reward.workers=0", "rollout.prompts_per_step=4",
            "train.mini_batch_prompts=4", "train.micro_batch_size=4", "rollout.gpu_memory_utilization=0.2",
            "rollout.dynamic_sampling=false"]  # an untrained model: groups may be all wrong
    env = dict(os.environ, LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    t0 = time.perf_counter()
    first = subprocess.run(base + ["train.steps=2"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    second = subprocess.run(base + ["train.steps=3"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    for name, res in (("first", first), ("resume", second)):
        if res.returncode:
            return f"{name} run exited {res.returncode}: {res.stderr.strip().splitlines()[-1:]}", False
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    ok = "resumed from" in second.stdout and steps == [1, 2, 3]
    return f"steps logged {steps}, resumed: {'resumed from' in second.stdout}, {time.perf_counter() - t0:.0f} s", ok


@check("2 GPUs: TP 2, DP 2 and PP 2 vs TP 1; engines at inference TP 2 and two at TP 1", MULTI, needs=("vllm",))
def c_multi(ctx):
    if not ctx.multi_on_cpu:
        need_gpu(2)
    from megatron_hapo.training.policy import PolicyBatch

    ref_policy = ctx.new_policy(algo="dapo")
    b = ctx.batch(seed=11)
    logp, _ = ref_policy.compute_logprobs(b)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], device=dev.device())
    m = ref_policy.train_step(PolicyBatch(b.input_ids, b.loss_mask, advantages=adv, old_logp=logp))
    torch.save({"input_ids": b.input_ids.cpu(), "loss_mask": b.loss_mask.cpu(), "advantages": adv.cpu(), "logp": logp.cpu(),
                "after": ref_policy.hf_state_dict(), "loss": m["loss"], "grad_norm": m["grad_norm"]},
               os.path.join(ctx.work, "reference.pt"))
    figures, ok = [], True
    for extra in ([], ["--engines-tp1"]):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              os.path.join(ROOT, "tools", "gpu_selftest_multi.py"), ctx.work] + extra,
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
        lines = [x for x in res.stdout.splitlines() if x.startswith("MULTI ")]
        if res.returncode or not lines:
            return f"{' '.join(extra) or 'layouts'} exited {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1][:200]}", False
        result = json.loads(lines[-1][6:])
        figures.append(result["figure"])
        ok = ok and result["ok"]
    return ("" if dev.is_gpu() else "(CPU, gloo) ") + "; ".join(figures), ok


@check("2 GPUs: separate placement (trainer on one GPU, engine rank on the other): NCCL weight transfer, GB/s vs a "
       "device-to-device copy", MULTI)
def c_bridge(ctx):
    if not ctx.multi_on_cpu:
        need_gpu(2)
    ctx.ensure_model()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          os.path.join(ROOT, "tools", "gpu_selftest_bridge.py"), ctx.work, "1024" if dev.is_gpu() else "64"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = [x for x in res.stdout.splitlines() if x.startswith("BRIDGE ")]
    if res.returncode or not lines:
        errors = [x for x in res.stderr.splitlines() if "Error" in x] or res.stderr.strip().splitlines() or [""]
        return f"exited {res.returncode}: {errors[-1][:200]}", False
    result = json.loads(lines[-1][7:])
    return ("" if dev.is_gpu() else "(CPU, gloo) ") + result["figure"], result["ok"]


@check("weights walk (hf_weights, what sync and export stream) stays on the device; GB/s vs a device copy", TRAINING)
def c_weights_walk(ctx):
    policy = ctx.new_policy()  # the HF folder's weights, untrained: the walk must give them back exactly
    walked = []
    t_walk = _timed(lambda: walked.extend(policy.hf_weights()))
    off_device = [n for n, t in walked if t.device != dev.device()]
    nbytes = sum(t.numel() * t.element_size() for _, t in walked)
    t_copy = _timed(lambda: [t.clone() for _, t in walked])
    exact = all(torch.equal(t.cpu(), ctx.hf[n]) for n, t in walked if n in ctx.hf) and {n for n, _ in walked} <= set(ctx.hf)
    figure = (f"{len(walked)} tensors, {nbytes / 2**20:.1f} MiB on {dev.device()}: walk {t_walk * 1e3:.1f} ms "
              f"({nbytes / t_walk / 1e9:.2f} GB/s) vs a device copy {t_copy * 1e3:.2f} ms; equal to the HF weights "
              f"loaded: {exact}")
    if off_device:
        figure += f"; off the device: {off_device[:3]}"
    return figure, not off_device and exact


@check("temperature kernel (Triton on GPU, C++ on CPU) and eager path vs float64; GB/s vs a device copy", MEASURE)
def c_temperature_kernel(ctx):
    from megatron_hapo import algorithms as A
    from megatron_hapo.rollout import temperature_processor as tp

    need_compiler()
    device = dev.device()
    rows, vocab = (64, 151_936) if dev.is_gpu() else (16, 32_768)
    stats = A.EntropyStats(q=math.log(4.0), sigma=0.5, z_pos=2.0, z_neg=-3.0)
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(device)
    logits[:, -50:] = float("-inf")
    x64 = logits.double()
    logp = torch.log_softmax(x64, -1)
    ent = -(torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0)).sum(-1)
    temp = A.adaptive_temperature(ent, stats, 1.0, 0.2, "signed").double()
    ref = torch.stack([temp, ent, torch.logsumexp(x64, -1), torch.logsumexp(x64 / temp[:, None], -1)], 1).cpu()
    saved, figures, ok = tp._FUSED["wanted"], [], True
    nbytes = logits.numel() * logits.element_size()
    try:
        for path in ("fused", "eager"):
            tp.use_fused(path == "fused")
            # one request per row, each at its first response position
            proc = _processor(tp, device, [(f"k-{path}-{i}", stats, 1.0, 0.2, "signed", []) for i in range(rows)])
            proc.apply(logits.clone())  # warm-up (compiles the fused kernel)
            tp.RECORDER.pop({f"k-{path}-{i}" for i in range(rows)})
            work = iter([logits.clone() for _ in range(5)])
            t = _timed(lambda: proc.apply(next(work)), reps=5)
            rec = tp.RECORDER.pop({f"k-{path}-{i}" for i in range(rows)})
            got = torch.tensor([rec[f"k-{path}-{i}"][0] for i in range(rows)], dtype=torch.float64)
            err = ((got - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
            ok = ok and err < 1e-4
            if path == "fused":
                ok = ok and tp.fused_failure() is None
            figures.append(f"{path} {t * 1e3:.2f} ms ({4 * nbytes / t / 1e9:.0f} GB/s at 3 reads + 1 write), "
                           f"max rel err {err:.1e}")
    finally:
        tp.use_fused(saved)
    t_copy = _timed(logits.clone, reps=5)
    return (f"{rows} × {vocab:,} fp32 logits: " + "; ".join(figures) + f"; device copy {t_copy * 1e3:.2f} ms "
            f"({2 * nbytes / t_copy / 1e9:.0f} GB/s); tol 1e-4"), ok


H100_H200_BF16_DENSE = 989.4e12  # FLOP/s, the SXM parts' dense bf16 peak


@check("update MFU: a 0.5 B Qwen2-shaped model built in code, bf16, 4096-token sequences", MEASURE)
def c_mfu(ctx):
    """Model FLOPs utilisation of the policy update (forward + backward + optimizer step) on a model of
    Qwen2.5-0.5B's shape (random weights, the HAPO loss, distributed optimizer), 8 sequences of 4096."""
    need_gpu()
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig
    import transformers

    cfg = transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True)
    spec = ModelSpec.from_hf(cfg)
    rows, seq, mbs = 8, 4096, 1
    policy = MegatronPolicy(spec, PolicyConfig(micro_batch_size=mbs, dtype="bfloat16", lr=1e-5, lr_warmup_steps=0,
                                               use_distributed_optimizer=True, layer_spec=ctx.layer_spec),
                            AlgorithmConfig.preset("hapo"))
    params = sum(p.numel() for c in policy.chunks for p in c.module.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_000, (rows, seq), generator=g).to(dev.device())
    mask = torch.ones(rows, seq, dtype=torch.bool, device=dev.device())
    mask[:, :256] = False  # a prompt
    mask[:, -1] = False
    old, ent = policy.compute_logprobs(PolicyBatch(ids, mask))
    batch = PolicyBatch(ids, mask, advantages=torch.linspace(-1, 1, rows, device=dev.device()), old_logp=old,
                        h_hat=torch.zeros_like(ent))
    policy.train_step(batch)  # warm-up
    _sync()
    steps = 3
    t0 = time.perf_counter()
    for _ in range(steps):
        m = policy.train_step(batch)
    _sync()
    t = (time.perf_counter() - t0) / steps
    tokens = rows * seq
    h, L, v = spec.hidden_size, spec.num_layers, spec.vocab_size
    dense = params - v * h  # the matmul parameters of the layers; the tied output layer counted once below
    flops = 6 * tokens * (dense + v * h) + 6 * tokens * L * seq * h  # + causal attention: 12·L·s·h per token / 2
    name = torch.cuda.get_device_name()
    peak = H100_H200_BF16_DENSE if ("H100" in name or "H200" in name) else None
    mfu = f"MFU {flops / t / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known for this GPU"
    return (f"{params / 1e9:.2f} B parameters, {rows} × {seq} tokens, {ctx.layer_spec} spec: {t:.3f} s a step, "
            f"{tokens / t:,.0f} tokens/s, {flops / t / 1e12:.0f} TFLOP/s, {mfu}; loss {m['loss']:.4f}"), \
        math.isfinite(m["loss"]) and not m["skipped"]


# ---- driver ----------------------------------------------------------------------------------------

def _not_installed(c: Check) -> Optional[str]:
    missing = [m for m in c.needs if not installed(m)]
    return f"skipped: not installed ({', '.join(missing)})" if missing else None


def run_check(c: Check, ctx: Ctx) -> tuple:
    """(status, figure) of one check in this process."""
    if _not_installed(c):
        return "skipped", _not_installed(c)
    try:
        figure, ok = c.fn(ctx)
        return ("pass" if ok else "FAIL"), figure
    except Skip as exc:
        return "skipped", str(exc)
    except Exception as exc:  # a failing layer: say where, keep going with the others
        traceback.print_exc()
        return "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}"


def run_isolated(c: Check, layer_spec: str, work: str, timeout: float) -> tuple:
    """One check in a child process of its own (a fresh vLLM state); its result comes back as JSON."""
    if _not_installed(c):
        return "skipped", _not_installed(c)
    out = os.path.join(work, f"child-{CHECKS.index(c)}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", c.name, "--out", out, "--layer-spec", layer_spec]
    # a world of its own: not the rendezvous this process's single-rank world took
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(timeout, 30))
    except subprocess.TimeoutExpired:
        return "FAIL", f"the child process ran past {timeout:.0f} s"
    if not os.path.exists(out):
        tail = (res.stderr.strip().splitlines() or [""])[-1][:300]
        return "FAIL", f"the child process exited {res.returncode} without a result: {tail}"
    with open(out) as f:
        r = json.load(f)["results"][0]
    return r["status"], r["figure"] + " (own process)"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def table(results, where) -> str:
    w = max(len(r["check"]) for r in results)
    lines = [f"GPU self-test on {where}", f"| {'check':<{w}} | status  | seconds | peak GiB | figure"]
    for r in results:
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['check']:<{w}} | {r['status']:<7} | {r['seconds']:>7.1f} | {peak:>8} | {r['figure']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_selftest.json", help="the JSON results")
    p.add_argument("--table", help="also write the table to this file")
    p.add_argument("--skip", default="", help="comma-separated check-name fragments to skip (e.g. trainer,2 GPUs)")
    p.add_argument("--only", default="", help="comma-separated check-name fragments to run")
    p.add_argument("--layer-spec", default="auto", choices=("auto", "te", "local"),
                   help="the spec the training checks build (auto: TE where a GPU and Transformer Engine are there)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds: checks not started by then are skipped (the order puts the most important first)")
    p.add_argument("--multi-on-cpu", action="store_true", help="run the 2-rank check over gloo without GPUs (tests)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one check, by exact name, in this process (isolated checks)
    p.add_argument("--check-imports", action="store_true",
                   help="only import what the checks need; exit 2 naming the first missing module")
    a = p.parse_args(argv)
    if a.check_imports:
        return check_imports()
    skip = [s for s in a.skip.split(",") if s]
    only = [s for s in a.only.split(",") if s]
    dev.set_current()
    spec = resolve_spec(a.layer_spec)
    checks = sorted(CHECKS, key=lambda c: c.tier)  # stable: definition order within a tier
    if a.child:
        checks = [c for c in checks if c.name == a.child]
    PREFLIGHT["compile"] = compile_preflight()
    if PREFLIGHT["compile"] and not a.child:
        print(f"preflight: the fused temperature kernel cannot compile here: {PREFLIGHT['compile']}; "
              f"its checks will say so", flush=True)
    results, t_start = [], time.perf_counter()

    def write(final: bool) -> str:
        """The JSON and the table as they stand: after every check, so a timeout or a kill keeps what finished."""
        where = (f"{torch.cuda.get_device_name()}, {torch.cuda.device_count()} GPU(s)" if dev.is_gpu()
                 else "CPU (no GPU)") + f"; torch {torch.__version__}; layer spec {spec}; " \
            f"{time.perf_counter() - t_start:.0f} s" + ("" if final else f"; {len(results)} of {len(checks)} checks so far")
        text = table(results, where) if results else f"GPU self-test on {where}: no check finished"
        if a.table:
            _write_atomic(a.table, text + "\n")
        _write_atomic(a.out, json.dumps({"device": where, "layer_spec": spec, "complete": final,
                                         "preflight": PREFLIGHT, "results": results}, indent=2))
        return text

    with tempfile.TemporaryDirectory(prefix="gpu-selftest-") as work:
        ctx = Ctx(work, spec)
        ctx.multi_on_cpu = a.multi_on_cpu
        for c in checks:
            t0 = time.perf_counter()
            left = a.budget - (t0 - t_start) if a.budget else 3600.0
            if not a.child and (any(x in c.name for x in skip) or (only and not any(x in c.name for x in only))):
                status, figure = "skipped", "skipped: not selected"
            elif left <= 0:
                status, figure = "skipped", f"skipped: over the --budget of {a.budget:g} s"
            else:
                if dev.is_gpu():
                    torch.cuda.reset_peak_memory_stats()
                if c.isolated and not a.child:
                    status, figure = run_isolated(c, spec, work, left)
                else:
                    status, figure = run_check(c, ctx)
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev.is_gpu() and status != "skipped" else None
            results.append({"check": c.name, "status": status, "figure": figure, "seconds": round(time.perf_counter() - t0, 2),
                            "peak_gib": None if peak is None else round(peak, 3)})
            write(final=False)
            print(f"[{status:>7}] {c.name}: {figure}", flush=True)
    text = write(final=True)
    if not a.child:
        print("\n" + text)
        print(f"wrote {a.out}" + (f" and {a.table}" if a.table else ""))
    try:
        from megatron_hapo.training.parallel import destroy_model_parallel

        destroy_model_parallel()
    except Exception:
        pass
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
