"""Hugging Face config.json → Megatron-Core TransformerConfig and GPTModel arguments.

Families: Llama (llama), Qwen2 (qkv bias), Qwen3 (qk-norm, explicit head_dim), Qwen3-MoE
(qwen3_moe: every layer's MLP a set of routed experts, softmax top-k routing). Parallel sizes are
checked here, so a bad layout fails at start-up naming the setting.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from .. import device as dev

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture facts the model builder and the HF ↔ Megatron mapping need."""

    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: Optional[dict] = None
    # Mixture of experts (0 experts: a dense model)
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = False
    moe_aux_loss_coef: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_hf(cls, config) -> "ModelSpec":
        """From a config.json path, a folder holding one, a dict or a transformers PretrainedConfig."""
        if isinstance(config, (str, os.PathLike)):
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            with open(path) as f:
                config = json.load(f)
        elif not isinstance(config, dict):
            config = config.to_dict()
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"config.model_type: {family!r} is not supported; expected one of {FAMILIES}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"config: missing {missing}")
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        rope = config.get("rope_parameters") or {}  # transformers ≥ 5 writes theta and scaling here
        rope_scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in ("llama3", "default"):
            raise ValueError(f"config.rope_scaling: {rope_scaling} is not supported (only llama3-style)")
        moe = {}
        if family == "qwen3_moe":
            if "num_experts" not in config and "num_local_experts" in config:  # transformers 5 writes this name
                config = dict(config, num_experts=config["num_local_experts"])
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                if not config.get(k):
                    raise ValueError(f"config.{k}: required for a qwen3_moe model, got {config.get(k)!r}")
            if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
                raise ValueError(f"config.decoder_sparse_step={config.get('decoder_sparse_step')}, mlp_only_layers="
                                 f"{config.get('mlp_only_layers')}: dense layers between the MoE layers are not supported "
                                 "(every layer must be MoE: decoder_sparse_step=1, mlp_only_layers=[])")
            if config.get("shared_expert_intermediate_size"):
                raise ValueError("config.shared_expert_intermediate_size: shared experts are not supported for qwen3_moe")
            if config["num_experts_per_tok"] > config["num_experts"]:
                raise ValueError(f"config.num_experts_per_tok={config['num_experts_per_tok']} exceeds "
                                 f"num_experts={config['num_experts']}")
            moe = dict(num_experts=config["num_experts"], moe_top_k=config["num_experts_per_tok"],
                       moe_ffn_hidden_size=config["moe_intermediate_size"],
                       moe_norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                       moe_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0) or 0.0))
        return cls(
            family=family,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            ffn_hidden_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            rope_scaling=rope_scaling if rope_scaling and rope_scaling.get("rope_type") == "llama3" else None,
            **moe,
        )


def check_layout(spec: ModelSpec, tp: int, pp: int, vpp: Optional[int] = None, ep: int = 1,
                 etp: Optional[int] = None) -> None:
    """Raises ValueError naming the setting when the model cannot be split this way."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}: must be ≥ 1")
    etp = tp if etp is None else etp
    if ep != 1 or etp != tp:
        if not spec.is_moe:
            raise ValueError(f"expert_model_parallel_size={ep}, expert_tensor_parallel_size={etp}: the model has no "
                             f"experts (model_type {spec.family!r})")
        if ep < 1 or etp < 1:
            raise ValueError(f"expert_model_parallel_size={ep}, expert_tensor_parallel_size={etp}: must be ≥ 1")
        if spec.num_experts % ep:
            raise ValueError(f"expert_model_parallel_size={ep} does not divide num_experts={spec.num_experts}")
        if ep == 1 and etp != tp:
            # measured: DDP then all-reduces different expert shards as if they were replicas
            raise ValueError(f"expert_tensor_parallel_size={etp} differs from tensor_model_parallel_size={tp} with "
                             "expert_model_parallel_size=1: Megatron's gradients are wrong there; use ETP = TP or EP > 1")
    if spec.is_moe and spec.moe_ffn_hidden_size % etp:
        raise ValueError(f"expert_tensor_parallel_size={etp} does not divide moe_intermediate_size={spec.moe_ffn_hidden_size}")
    if spec.num_heads % tp:
        raise ValueError(f"tensor_model_parallel_size={tp} does not divide num_attention_heads={spec.num_heads}")
    if spec.num_kv_heads % tp:
        raise ValueError(f"tensor_model_parallel_size={tp} does not divide num_key_value_heads={spec.num_kv_heads} "
                         "(KV groups are not replicated across TP ranks)")
    if not spec.is_moe and spec.ffn_hidden_size % tp:
        raise ValueError(f"tensor_model_parallel_size={tp} does not divide intermediate_size={spec.ffn_hidden_size}")
    stages = pp * (vpp or 1)
    if stages > spec.num_layers:
        raise ValueError(f"pipeline_model_parallel_size={pp}" + (f" × virtual {vpp}" if vpp else "")
                         + f" exceeds num_hidden_layers={spec.num_layers}")
    if spec.num_layers % stages:
        raise ValueError(f"pipeline_model_parallel_size={pp}" + (f" × virtual {vpp}" if vpp else "")
                         + f" does not divide num_hidden_layers={spec.num_layers}")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padding: a multiple of divisible_by × TP."""
    m = divisible_by * tp
    return ((vocab_size + m - 1) // m) * m


def moe_config(spec: ModelSpec, ep: int = 1, etp: Optional[int] = None, *, aux_loss_coef: Optional[float] = None,
               z_loss_coef: float = 0.0, layer_spec: str = "local") -> dict:
    """TransformerConfig fields of a MoE model ({} for a dense one). Routing as HF's Qwen3-MoE
    (exact to fp32 rounding, docs/MOE.md): softmax over all experts then top-k, renormalized over
    the k chosen when norm_topk_prob (Megatron: softmax over the top-k logits, pre_softmax=False),
    router in fp32, no capacity limit (no token dropped, as in HF and vLLM). aux_loss_coef None =
    the config's router_aux_loss_coef."""
    if not spec.is_moe:
        return {}
    coef = spec.moe_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
    return dict(
        num_moe_experts=spec.num_experts, moe_router_topk=spec.moe_top_k, moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_score_function="softmax", moe_router_pre_softmax=not spec.moe_norm_topk_prob,
        moe_router_dtype="fp32", moe_router_load_balancing_type="aux_loss" if coef > 0 else "none",
        moe_aux_loss_coeff=coef, moe_z_loss_coeff=z_loss_coef or None, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=layer_spec == "te", expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def transformer_config(spec: ModelSpec, tp: int = 1, pp: int = 1, *, dtype=torch.float32, sequence_parallel=False,
                       vpp: Optional[int] = None, init_std: float = 0.02, ep: int = 1, etp: Optional[int] = None,
                       aux_loss_coef: Optional[float] = None, z_loss_coef: float = 0.0, layer_spec: str = "local"):
    from megatron.core.transformer import TransformerConfig

    check_layout(spec, tp, pp, vpp, ep, etp)
    bf16 = dtype == torch.bfloat16
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        bf16=bf16,
        pipeline_dtype=dtype,
        # on GPU the weights are created on the rank's current device (set before this); on CPU there is no other
        use_cpu_initialization=not dev.is_gpu(),
        init_method_std=init_std,
        **moe_config(spec, ep, tp if etp is None else etp, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                     layer_spec=layer_spec),
    )


def attention_mask_for(layer_spec: str, mask):
    """The attention mask to hand a GPTModel: the local spec needs the explicit causal mask; TE's
    attention with the causal mask type implies it (Megatron passes None there too)."""
    return mask if layer_spec == "local" else None


class RMSNorm(torch.nn.RMSNorm):
    """The local spec's norm: torch's RMSNorm (what Megatron's WrappedTorchNorm builds, the same
    numbers) that also runs under sequence parallelism: its weight is marked `sequence_parallel`,
    so Megatron all-reduces its gradient over the TP group (each TP rank normed its own slice of
    the sequence). WrappedTorchNorm refuses sequence parallelism outright."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if normalization != "RMSNorm" or zero_centered_gamma:
            raise ValueError(f"RMSNorm: normalization={normalization!r}, zero_centered_gamma={zero_centered_gamma} "
                             "are not supported")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def _with_norm(spec, old, new):
    """A module spec (or submodules dataclass) with every `old` norm class replaced by `new`."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_with_norm(spec.module, old, new),
                                   submodules=_with_norm(spec.submodules, old, new))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _with_norm(getattr(spec, f.name), old, new)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def local_block_spec(spec: ModelSpec, config, vp_stage=None):
    """The local spec as a whole block with our norm (layers and the final norm)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(num_experts=spec.num_experts or None, moe_grouped_gemm=False,
                                     qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    layer = _with_norm(layer, WrappedTorchNorm, RMSNorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=RMSNorm)


def build_gpt_model(spec: ModelSpec, config, *, pre_process: bool, post_process: bool, vp_stage=None,
                    layer_spec: Optional[str] = None):
    """One GPTModel chunk for this rank on its device. layer_spec: "te" (Transformer Engine, fused
    norm+linear; GPU) or "local" (torch modules); None/"auto": te on GPU, local on CPU."""
    from megatron.core.models.gpt import GPTModel

    layer_spec = dev.resolve_layer_spec(layer_spec)
    if layer_spec == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        module_spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=spec.num_experts or None, moe_grouped_gemm=spec.is_moe, qk_layernorm=spec.qk_norm)
    else:
        module_spec = local_block_spec(spec, config, vp_stage)
    kwargs = {}
    if spec.rope_scaling:
        kwargs.update(rope_scaling=True, rope_scaling_factor=spec.rope_scaling.get("factor", 8.0))
    with dev.megatron_scope():
        model = GPTModel(
            config=config,
            transformer_layer_spec=module_spec,
            vocab_size=padded_vocab_size(spec.vocab_size, config.tensor_model_parallel_size),
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(spec.rope_theta),
            vp_stage=vp_stage,
            **kwargs,
        )
    return model.to(device=dev.device(), dtype=config.params_dtype)


def stop_token_ids(tokenizer, model_dir: str) -> tuple:
    """End-of-sequence ids: the tokenizer's and those of the folder's generation_config.json."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))
