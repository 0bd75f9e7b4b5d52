"""Hugging Face ↔ Megatron-Core parameter names and layouts (Llama, Qwen2, Qwen3).

Shared by the policy (loading weights), the weight sync into vLLM and the conversion tools.
Layout facts (megatron-core, local and TE specs alike):
- linear_qkv rows are grouped per KV group: [q heads of group g; k_g; v_g] for g = 0..G-1;
- linear_fc1 is [gate; up]; a TP rank holds [gate_r; up_r];
- column-parallel weights (qkv, fc1, embeddings, output layer) split on dim 0, row-parallel
  ones (linear_proj, linear_fc2) on dim 1; norms are replicated;
- the vocabulary is padded to a multiple of 128·TP (padding rows are zero);
- with PP, each stage numbers its layers from 0; the global index adds the stage's offset;
- MoE (Qwen3-MoE): the router `mlp.router.weight` [E, H] (HF `mlp.gate.weight`) is replicated; each
  expert is a small MLP (fc1 = [gate; up], fc2 = down) split over the expert-TP group like the dense
  one; an EP rank holds experts ep_rank·E/EP … (ep_rank + 1)·E/EP − 1, numbered from 0 locally:
  `mlp.experts.local_experts.j.linear_fc1.weight` (local spec, SequentialMLP) or
  `mlp.experts.linear_fc1.weight{j}` (TE spec, TEGroupedMLP). The pre-MLP norm stays a separate
  `pre_mlp_layernorm.weight` with TE too (the router reads the normed input). Names outside one EP
  rank (sync, export, conversion) carry the global expert index in place of j.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, Optional, Tuple

import torch

from .hf_config import ModelSpec, padded_vocab_size

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron suffix inside a layer → (HF suffix, kind); kind tells how TP splits it.
_LAYER_PARAMS = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicated"),
    "self_attention.linear_qkv.weight": (None, "qkv"),
    "self_attention.linear_qkv.bias": (None, "qkv"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", "replicated"),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", "replicated"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", "row"),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", "replicated"),
    "mlp.linear_fc1.weight": (None, "fc1"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", "row"),
}
# The Transformer Engine spec fuses the norms into the following linear layer (TELayerNormColumn-
# ParallelLinear): its parameters live under these names; input_layernorm and pre_mlp_layernorm are
# IdentityOp there. Megatron's distributed checkpoints store the local spec's norms under the same TE
# names (the local spec's sharded_state_dict_keys_map), so checkpoints of both specs interchange.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_TE_NAMES = {local: te for te, local in _TE_ALIASES.items()}
LAYER_SPECS = ("te", "local")


_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.linear_(fc1|fc2)\.weight|linear_(fc1|fc2)\.weight(\d+))$")
_MOE_LAYER_PARAMS = {
    "mlp.router.weight": ("mlp.gate.weight", "replicated"),
}
_DENSE_MLP = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


def layer_param_name(suffix: str, layer_spec: str, moe: bool = False) -> str:
    """The name of a layer parameter (local-spec suffix) in a model built with `layer_spec`."""
    if layer_spec not in LAYER_SPECS:
        raise ValueError(f"layer_spec: {layer_spec!r}; expected one of {LAYER_SPECS}")
    if layer_spec != "te" or (moe and suffix == "pre_mlp_layernorm.weight"):
        return suffix
    return _TE_NAMES.get(suffix, suffix)


def expert_param(suffix: str) -> Optional[Tuple[int, str]]:
    """(expert index, "fc1" | "fc2") of an expert weight's layer suffix, either spec; else None."""
    m = _EXPERT.match(suffix)
    if m is None:
        return None
    return (int(m.group(1)), m.group(2)) if m.group(1) is not None else (int(m.group(4)), m.group(3))


def expert_param_name(index: int, which: str, layer_spec: str) -> str:
    """The layer suffix of expert `index`'s fc1/fc2 weight in a model built with `layer_spec`."""
    if layer_spec == "te":
        return f"mlp.experts.linear_{which}.weight{index}"
    return f"mlp.experts.local_experts.{index}.linear_{which}.weight"


def with_expert_index(name: str, index: int) -> str:
    """A Megatron expert parameter's name with another expert index (local ↔ global)."""
    m = _LAYER.match(name)
    e = expert_param(m.group(2)) if m else None
    if e is None:
        raise KeyError(f"{name!r} is not an expert parameter")
    layer_spec = "local" if ".local_experts." in name else "te"
    return f"decoder.layers.{m.group(1)}.{expert_param_name(index, e[1], layer_spec)}"


def unfuse_hf_experts(hf: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers 5 keeps a layer's experts fused in memory (`mlp.experts.gate_up_proj` [E, 2I, H],
    gate first; `mlp.experts.down_proj` [E, H, I]) and saves them per expert; this gives the saved
    (checkpoint) names, the ones this module maps. Other tensors pass through."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{p}{e}.gate_proj.weight"], out[f"{p}{e}.up_proj.weight"] = gate[e], up[e]
        elif name.endswith("mlp.experts.down_proj"):
            p = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def layer_offset(spec: ModelSpec, pp_rank: int, pp: int, vp_stage: Optional[int] = None, vpp: Optional[int] = None) -> int:
    """Global index of a stage's first layer (Megatron's interleaved order with virtual stages)."""
    per_chunk = spec.num_layers // (pp * (vpp or 1))
    return ((vp_stage or 0) * pp + pp_rank) * per_chunk


# ---- HF → Megatron ---------------------------------------------------------------------------

def _qkv_full(hf: Dict[str, torch.Tensor], prefix: str, spec: ModelSpec, kind: str) -> torch.Tensor:
    q, k, v = (hf[f"{prefix}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v"))
    g, d = spec.num_kv_heads, spec.head_dim
    per = spec.num_heads // g
    q = q.reshape(g, per * d, *q.shape[1:])
    k = k.reshape(g, d, *k.shape[1:])
    v = v.reshape(g, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _split(t: torch.Tensor, kind: str, tp_rank: int, tp: int) -> torch.Tensor:
    if kind == "replicated" or tp == 1:
        return t
    if kind in ("column", "qkv"):
        return t.chunk(tp, dim=0)[tp_rank]
    if kind == "row":
        return t.chunk(tp, dim=1)[tp_rank]
    if kind == "fc1":  # t = [gate; up]
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    raise ValueError(kind)


def _pad_vocab(t: torch.Tensor, spec: ModelSpec, tp: int) -> torch.Tensor:
    padded = padded_vocab_size(spec.vocab_size, tp)
    if t.shape[0] != spec.vocab_size:
        raise ValueError(f"vocabulary rows: {t.shape[0]} in the checkpoint, {spec.vocab_size} in the config")
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])]) if padded > t.shape[0] else t


def hf_to_megatron(
    hf: Dict[str, torch.Tensor],
    spec: ModelSpec,
    tp_rank: int = 0,
    tp: int = 1,
    pp_rank: int = 0,
    pp: int = 1,
    vp_stage: Optional[int] = None,
    vpp: Optional[int] = None,
    layer_spec: str = "local",
    ep_rank: int = 0,
    ep: int = 1,
    etp_rank: Optional[int] = None,
    etp: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """The state dict of one model chunk (Megatron names of `layer_spec`'s modules, local layer
    numbering, local expert numbering) from HF tensors (checkpoint names: `unfuse_hf_experts`).
    Experts: this EP rank's, split over the expert-TP group (etp default: tp)."""
    etp_rank, etp = (tp_rank, tp) if etp is None else (etp_rank or 0, etp)
    stages = pp * (vpp or 1)
    per_chunk = spec.num_layers // stages
    first = layer_offset(spec, pp_rank, pp, vp_stage, vpp)
    chunk_index = (vp_stage or 0) * pp + pp_rank
    out: Dict[str, torch.Tensor] = {}
    if chunk_index == 0:
        out["embedding.word_embeddings.weight"] = _split(_pad_vocab(hf["model.embed_tokens.weight"], spec, tp), "column", tp_rank, tp)
    for local in range(per_chunk):
        p = f"model.layers.{first + local}."
        for m_suffix, (hf_suffix, kind) in _LAYER_PARAMS.items():
            if spec.is_moe and m_suffix in _DENSE_MLP:
                continue
            if kind == "qkv":
                which = m_suffix.rsplit(".", 1)[1]
                if which == "bias" and not spec.qkv_bias:
                    continue
                full = _qkv_full(hf, p, spec, which)
            elif kind == "fc1":
                full = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], dim=0)
            else:
                if "layernorm" in m_suffix and ("q_layernorm" in m_suffix or "k_layernorm" in m_suffix) and not spec.qk_norm:
                    continue
                full = hf[p + hf_suffix]
            out[f"decoder.layers.{local}.{layer_param_name(m_suffix, layer_spec, spec.is_moe)}"] = _split(full, kind, tp_rank, tp)
        if spec.is_moe:
            out[f"decoder.layers.{local}.mlp.router.weight"] = hf[p + "mlp.gate.weight"]
            per = spec.num_experts // ep
            for j in range(per):
                e = f"{p}mlp.experts.{ep_rank * per + j}."
                fc1 = torch.cat([hf[e + "gate_proj.weight"], hf[e + "up_proj.weight"]], dim=0)
                out[f"decoder.layers.{local}.{expert_param_name(j, 'fc1', layer_spec)}"] = _split(fc1, "fc1", etp_rank, etp)
                out[f"decoder.layers.{local}.{expert_param_name(j, 'fc2', layer_spec)}"] = _split(
                    hf[e + "down_proj.weight"], "row", etp_rank, etp)
    if chunk_index == stages - 1:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not spec.tie_word_embeddings:
            out["output_layer.weight"] = _split(_pad_vocab(hf["lm_head.weight"], spec, tp), "column", tp_rank, tp)
        elif stages > 1:  # tied, but the last stage keeps its own copy of the embedding (synced by Megatron)
            out["output_layer.weight"] = _split(_pad_vocab(hf["model.embed_tokens.weight"], spec, tp), "column", tp_rank, tp)
    return out


# ---- Megatron → HF ---------------------------------------------------------------------------

def param_kind(megatron_name: str) -> str:
    """How TP splits a parameter: column, row, qkv, fc1 or replicated."""
    if megatron_name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "column"
    m = _LAYER.match(megatron_name)
    if m is None:
        return "replicated"
    e = expert_param(m.group(2))
    if e is not None:
        return "fc1" if e[1] == "fc1" else "row"
    if m.group(2) in _MOE_LAYER_PARAMS:
        return _MOE_LAYER_PARAMS[m.group(2)][1]
    suffix = _TE_ALIASES.get(m.group(2), m.group(2))
    if suffix not in _LAYER_PARAMS:
        raise KeyError(f"unknown Megatron parameter {megatron_name!r}")
    return _LAYER_PARAMS[suffix][1]


def expert_index(megatron_name: str) -> Optional[int]:
    """The expert index in an expert weight's Megatron name; None for any other parameter."""
    m = _LAYER.match(megatron_name)
    e = expert_param(m.group(2)) if m else None
    return None if e is None else e[0]


def merge_tp(name: str, shards) -> torch.Tensor:
    """Joins the TP shards of one Megatron parameter into its TP = 1 form."""
    kind = param_kind(name)
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind in ("column", "qkv"):
        return torch.cat(list(shards), dim=0)
    if kind == "row":
        return torch.cat(list(shards), dim=1)
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
    return torch.cat(list(gates) + list(ups), dim=0)


def megatron_to_hf(name: str, tensor: torch.Tensor, spec: ModelSpec, layer_base: int = 0) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of one TP-merged Megatron parameter; layer_base = the chunk's offset."""
    if name == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", tensor[: spec.vocab_size]
        return
    if name == "output_layer.weight":
        yield "lm_head.weight", tensor[: spec.vocab_size]
        return
    if name == "decoder.final_layernorm.weight":
        yield "model.norm.weight", tensor
        return
    m = _LAYER.match(name)
    if m is None:
        raise KeyError(f"unknown Megatron parameter {name!r}")
    p = f"model.layers.{layer_base + int(m.group(1))}."
    e = expert_param(m.group(2))
    if e is not None:  # the index is global here
        if e[1] == "fc1":
            gate, up = tensor.chunk(2, dim=0)
            yield f"{p}mlp.experts.{e[0]}.gate_proj.weight", gate
            yield f"{p}mlp.experts.{e[0]}.up_proj.weight", up
        else:
            yield f"{p}mlp.experts.{e[0]}.down_proj.weight", tensor
        return
    if m.group(2) in _MOE_LAYER_PARAMS:
        yield p + _MOE_LAYER_PARAMS[m.group(2)][0], tensor
        return
    suffix = _TE_ALIASES.get(m.group(2), m.group(2))
    hf_suffix, kind = _LAYER_PARAMS[suffix]
    if kind == "qkv":
        g, d = spec.num_kv_heads, spec.head_dim
        per = spec.num_heads // g
        grouped = tensor.reshape(g, (per + 2) * d, *tensor.shape[1:])
        q, k, v = grouped.split([per * d, d, d], dim=1)
        which = suffix.rsplit(".", 1)[1]
        for n, t in (("q", q), ("k", k), ("v", v)):
            yield f"{p}self_attn.{n}_proj.{which}", t.reshape(-1, *tensor.shape[1:])
    elif kind == "fc1":
        gate, up = tensor.chunk(2, dim=0)
        yield p + "mlp.gate_proj.weight", gate
        yield p + "mlp.up_proj.weight", up
    else:
        yield p + hf_suffix, tensor


def hf_param_shapes(spec: ModelSpec) -> Dict[str, tuple]:
    """Every HF parameter name of the model with its shape, in a stable order."""
    h, d, f = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes: Dict[str, tuple] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h)})
        if spec.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        shapes.update({p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,)})
        if spec.is_moe:
            mf = spec.moe_ffn_hidden_size
            shapes[p + "mlp.gate.weight"] = (spec.num_experts, h)
            for e in range(spec.num_experts):
                shapes.update({f"{p}mlp.experts.{e}.gate_proj.weight": (mf, h), f"{p}mlp.experts.{e}.up_proj.weight": (mf, h),
                               f"{p}mlp.experts.{e}.down_proj.weight": (h, mf)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def megatron_state_to_hf(named, spec: ModelSpec, layer_base: int = 0):
    """(HF name, tensor) for the (Megatron name, full tensor) pairs of one model chunk: the one
    Megatron → HF walk, used by the policy's weight iterator (sync, export) and by the offline
    conversion. TE `_extra_state` entries and a tied output layer's copy are skipped."""
    for name, t in named:
        if name.endswith("_extra_state") or (name == "output_layer.weight" and spec.tie_word_embeddings):
            continue
        yield from megatron_to_hf(name, t, spec, layer_base)
