"""Checkpoint conversion: Hugging Face folders ↔ Megatron-Core distributed checkpoints.

A Megatron distributed checkpoint is layout-independent (global tensors with shard metadata), so
one conversion serves every TP/PP: the trainer loads it at its own layout. The target layout
given here is validated against the model (heads, KV groups, layers) and recorded as a hint.
Outputs are written into a temporary folder and renamed into place at the end: an output folder
is complete or absent.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Dict, Optional

import torch

from .. import device as dev
from ..training.parallel import init_model_parallel
from .hf_config import ModelSpec, attention_mask_for, build_gpt_model, check_layout, transformer_config
from .mapping import hf_param_shapes, hf_to_megatron, megatron_state_to_hf

HF_ASSETS = "hf_config"  # inside a Megatron checkpoint: config.json and tokenizer files of the source
META = "megatron_hapo_meta.json"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _progress(iterable, total=None, desc=None, enabled=True):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor")


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"--dtype: {name!r}; expected fp32 or bf16")
    return _DTYPES[name]


def _check_output(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"output folder {out_dir} exists; choose a new one (nothing is overwritten)")
    return _temp_folder(out_dir)


def _temp_folder(out_dir: str) -> str:
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def read_hf_tensors(hf_dir: str) -> Dict[str, torch.Tensor]:
    """All tensors of a HF folder: model.safetensors or sharded with model.safetensors.index.json."""
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: Dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(os.path.join(hf_dir, name)))
    return tensors


def check_hf_tensors(tensors: Dict[str, torch.Tensor], spec: ModelSpec) -> Dict[str, torch.Tensor]:
    """Names and shapes against the architecture; errors name the tensor and both shapes."""
    expected = hf_param_shapes(spec)
    tensors = dict(tensors)
    if spec.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some exporters write the tied head too
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise KeyError(f"checkpoint has {len(extra)} tensors the {spec.family} architecture does not, e.g. {extra[:3]}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ValueError(f"tensor {k}: shape {tuple(tensors[k].shape)} in the checkpoint, {tuple(shape)} expected from config.json")
    return tensors


def copy_hf_assets(src: str, dst: str) -> None:
    """An HF folder's config, generation config, tokenizer files and chat template (not its weights)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith((".json", ".model", ".txt", ".tiktoken", ".jinja")) and not name.startswith("model.safetensors"):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def load_sharded(sharded: dict, path: str, where: str) -> dict:
    """dist_checkpointing.load that tolerates exactly Transformer Engine's `_extra_state` objects
    being present on one side only (a checkpoint written with the local spec, e.g. converted on a
    CPU node, loads into a TE model and back); any other mismatch raises naming the keys."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    with dev.megatron_scope():
        loaded, in_ckpt_only, in_model_only = dist_checkpointing.load(sharded, path, strict=StrictHandling.RETURN_ALL)
    # a model-only load of a training checkpoint leaves its optimizer state behind, rightly (a chained
    # optimizer's keys, MoE at EP > 1, start "chained_<i>.optimizer.")
    optimizer_key = re.compile(r"^(chained_\d+\.)?optimizer\.")
    bad_ckpt = sorted(k for k in in_ckpt_only if "_extra_state" not in k
                      and not ("optimizer" not in sharded and optimizer_key.match(k)))
    bad_model = sorted(k for k in in_model_only if "_extra_state" not in k)
    if bad_ckpt or bad_model:
        raise KeyError(f"{where} does not fit the model: {len(bad_model)} tensors the checkpoint lacks, e.g. "
                       f"{bad_model[:3]}; {len(bad_ckpt)} the model lacks, e.g. {bad_ckpt[:3]}")
    return loaded


def load_state_strict(module, state: dict, where: str) -> None:
    """load_state_dict that allows only Transformer Engine's _extra_state to be absent."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise KeyError(f"{where} does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def _single_process_model(spec: ModelSpec, dtype, layer_spec: Optional[str] = None):
    init_model_parallel(1, 1)
    return build_gpt_model(spec, transformer_config(spec, dtype=dtype), pre_process=True, post_process=True,
                           layer_spec=layer_spec).eval()


def hf_to_megatron_checkpoint(hf_dir: str, out_dir: str, dtype: str = "fp32", target_tp: int = 1, target_pp: int = 1,
                              progress: bool = True, target_ep: int = 1, target_etp: Optional[int] = None) -> str:
    from megatron.core import dist_checkpointing

    spec = ModelSpec.from_hf(hf_dir)
    check_layout(spec, target_tp, target_pp, ep=target_ep, etp=target_etp)
    torch_dtype = _dtype(dtype)
    tensors = check_hf_tensors(read_hf_tensors(hf_dir), spec)
    layer_spec = dev.resolve_layer_spec(None)
    tmp = _check_output(out_dir)
    try:
        model = _single_process_model(spec, torch_dtype, layer_spec)
        sd = hf_to_megatron(tensors, spec, layer_spec=layer_spec)
        own = model.state_dict()
        with torch.no_grad():
            for k, v in _progress(sd.items(), len(sd), "hf → megatron", progress):
                own[k].copy_(v.to(torch_dtype))
        with dev.megatron_scope():
            dist_checkpointing.save({"model": model.sharded_state_dict()}, tmp)
        copy_hf_assets(hf_dir, os.path.join(tmp, HF_ASSETS))
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"family": spec.family, "dtype": dtype, "target_tensor_model_parallel_size": target_tp,
                       "target_pipeline_model_parallel_size": target_pp, "target_expert_model_parallel_size": target_ep,
                       "layer_spec": layer_spec,
                       "source": os.path.abspath(hf_dir)}, f, indent=2)
        os.rename(tmp, os.path.abspath(out_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(out_dir)


def load_megatron_model(ckpt_dir: str, dtype: Optional[str] = None, hf_config_dir: Optional[str] = None):
    """(spec, single-process GPTModel) from a Megatron checkpoint written by this project."""
    cfg_dir = hf_config_dir or os.path.join(ckpt_dir, HF_ASSETS)
    if not os.path.exists(os.path.join(cfg_dir, "config.json")):
        raise FileNotFoundError(f"{ckpt_dir}: no {HF_ASSETS}/config.json; pass --hf-config with the model's config.json folder")
    spec = ModelSpec.from_hf(cfg_dir)
    if dtype is None:
        meta = os.path.join(ckpt_dir, META)
        dtype = json.load(open(meta))["dtype"] if os.path.exists(meta) else "fp32"
    model = _single_process_model(spec, _dtype(dtype))
    loaded = load_sharded({"model": model.sharded_state_dict()}, ckpt_dir, ckpt_dir)
    load_state_strict(model, loaded["model"], f"{ckpt_dir} (with its config.json)")
    return spec, model


def megatron_to_hf_checkpoint(ckpt_dir: str, out_dir: str, dtype: Optional[str] = None, hf_config_dir: Optional[str] = None,
                              max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> str:
    spec, model = load_megatron_model(ckpt_dir, dtype, hf_config_dir)
    items = list(model.state_dict().items())
    weights = megatron_state_to_hf(_progress(items, len(items), "megatron → hf", progress), spec)
    return save_hf_folder(weights, spec, out_dir, hf_config_dir or os.path.join(ckpt_dir, HF_ASSETS), max_shard_bytes)


def save_hf_folder(weights, spec: ModelSpec, out_dir: str, assets_dir: str, max_shard_bytes: int = 5 * 2**30,
                   write: bool = True, overwrite: bool = False) -> str:
    """The one HF writer: consumes `weights` ((HF name, tensor) pairs; every rank must, when they
    come from the policy's collective walk) and, where `write`, checks them against the
    architecture and writes safetensors shards of at most `max_shard_bytes` (with the index when
    there are several) plus the config and tokenizer files of `assets_dir`, into a temporary
    folder renamed into place: the folder is complete or absent. `overwrite` replaces an existing
    folder (the trainer's export); otherwise an existing one is refused."""
    from safetensors.torch import save_file

    hf: Dict[str, torch.Tensor] = {}
    for name, t in weights:  # every rank walks (collectives); only a writer keeps host copies
        if write:
            hf[name] = t.detach().contiguous().cpu().clone()
    out_dir = os.path.abspath(out_dir)
    if not write:
        return out_dir
    replace = overwrite and os.path.exists(out_dir)
    tmp = _check_output(out_dir) if not replace else _temp_folder(out_dir)
    try:
        check_hf_tensors(hf, spec)
        shards, current, size = [], {}, 0
        for name in hf_param_shapes(spec):
            nbytes = hf[name].numel() * hf[name].element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = hf[name]
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in hf.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        copy_hf_assets(assets_dir, tmp)
        if replace:  # the old folder stays whole until the new one is complete
            old = f"{out_dir}.old-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def verify(hf_dir: str, ckpt_dir: str, prompts: int = 4, length: int = 16, seed: int = 0,
           hf_config_dir: Optional[str] = None) -> float:
    """Max |logit difference| between transformers on hf_dir and Megatron on ckpt_dir, a few random
    prompts (hf_config_dir: the config for a checkpoint without its own, e.g. a training checkpoint)."""
    import transformers

    spec, model = load_megatron_model(ckpt_dir, hf_config_dir=hf_config_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (prompts, length), generator=g)
    mask = torch.ones(length, length, dtype=torch.bool).triu(1)[None, None].expand(prompts, 1, length, length)

    ids_d, mask_d = ids.to(dev.device()), attention_mask_for(dev.resolve_layer_spec(None), mask.to(dev.device()))
    with torch.no_grad(), dev.megatron_scope():
        ours = model.float()(ids_d, torch.arange(length, device=ids_d.device).expand(prompts, length),
                             mask_d)[..., : spec.vocab_size].cpu()
        ref = hf(ids).logits
    return (ours - ref).abs().max().item()


def main_hf_to_megatron(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Hugging Face folder → Megatron-Core distributed checkpoint")
    p.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--target-tp", type=int, default=1, help="checked against the model; any TP can load the result")
    p.add_argument("--target-pp", type=int, default=1)
    p.add_argument("--target-ep", type=int, default=1, help="MoE: expert parallelism, checked against the experts")
    p.add_argument("--target-etp", type=int, default=None, help="MoE: expert tensor parallelism (default: the TP)")
    p.add_argument("--verify", action="store_true", help="compare logits of both models on a few prompts")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out = hf_to_megatron_checkpoint(a.hf, a.out, a.dtype, a.target_tp, a.target_pp, not a.no_progress, a.target_ep,
                                    a.target_etp)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    if a.verify:
        print(f"verify: max |logit difference| HF vs Megatron = {verify(a.hf, out):.3e}")
    return 0


def main_megatron_to_hf(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Megatron-Core distributed checkpoint → Hugging Face folder")
    p.add_argument("--megatron", required=True, help="checkpoint folder (from convert_hf_to_megatron or training)")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--hf-config", default=None, help="folder with config.json when the checkpoint has none")
    p.add_argument("--dtype", default=None, choices=[None, "fp32", "bf16"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--verify", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out = megatron_to_hf_checkpoint(a.megatron, a.out, a.dtype, a.hf_config, int(a.max_shard_gb * 2**30), not a.no_progress)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    if a.verify:
        print(f"verify: max |logit difference| HF vs Megatron = {verify(out, a.megatron, hf_config_dir=a.hf_config):.3e}")
    return 0
