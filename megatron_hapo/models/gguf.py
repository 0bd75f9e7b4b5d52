"""GGUF file → Hugging Face folder (`megatron-hapo convert gguf-to-hf`, tools/gguf_to_hf.py).

People hold models as GGUF (llama.cpp's format, often the only copy a package ships). The
conversion goes through transformers' GGUF loader (weights dequantized to fp32 or bf16, the
tokenizer and chat template rebuilt from the file's metadata) and writes an ordinary HF folder:
safetensors, config.json without the GGUF quantization entry, generation_config.json whose EOS is
the file's own, tokenizer files and chat template. Like the other converters it writes into a
temporary folder renamed into place (complete or absent) and refuses an existing output.

Checks: every tensor finite; greedy text from the written folder, loaded back by transformers;
and with `--verify`, the written tensors against the GGUF read through another path: this
module's own dequantizer (F32, F16, BF16, Q8_0, Q4_0, Q4_1) over the raw blocks `gguf.GGUFReader`
returns, with llama.cpp's Q/K row permutation undone, tensor by tensor; plus, where
llama-cpp-python is installed, llama.cpp's own logits on the GGUF against transformers' on the
folder (the quantized kernels differ from dequantized fp32 ones, so the figure is top-1 agreement).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

# GGUF tensor names → HF names for the Llama / Qwen2 / Qwen3 families ("{i}": the layer)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
VERIFY_ATOL = 1e-5  # our dequantization vs transformers': both fp32 arithmetic on the same blocks
# llama.cpp's quantized kernels vs fp32 on the dequantized weights: measured 0.98 on SmolLM2-135M Q4_1
# (mean |logit difference| 0.21); a conversion that scrambles a matrix agrees at chance level
MIN_TOP1_AGREEMENT = 0.8


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise KeyError(f"GGUF tensor {gguf_name!r} has no Llama/Qwen2/Qwen3 counterpart")


# ---- an independent dequantizer (ggml's block formats, read from the raw bytes) -------------------------

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def dequantize(kind: str, data: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor's values as float32 [rows, cols] (shape in HF order). `data` is what
    GGUFReader gives: the typed array for F32/F16/BF16, uint8 rows of blocks for the quantized
    kinds (32 values a block)."""
    if kind == "F32":
        return np.asarray(data, dtype=np.float32).reshape(shape)
    if kind == "F16":
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(shape)
    if kind == "BF16":
        bits = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    sizes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
    if kind not in sizes:
        raise NotImplementedError(kind)
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, sizes[kind])
    d = _f16(blocks[:, 0:2])
    if kind == "Q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        values = d * q
    else:
        packed = blocks[:, 4:] if kind == "Q4_1" else blocks[:, 2:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)  # elements 0-15, then 16-31
        values = d * q + _f16(blocks[:, 2:4]) if kind == "Q4_1" else d * (q - 8.0)
    return values.reshape(shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's convert_hf_to_gguf permutation of Llama's Q and K rows (rotary halves
    interleaved per head) — `heads` is the KV head count for K."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(path: str):
    """(GGUF name, kind, HF-order shape, data) of every tensor in the file, and the metadata fields."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # an array type gguf cannot render: not needed here
            continue
    out = [(t.name, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), t.data) for t in reader.tensors]
    return out, fields


def verify_tensors(gguf_path: str, hf_dir: str) -> Dict[str, object]:
    """The written tensors against the GGUF dequantized here; raises naming the first tensor off."""
    from .convert import read_hf_tensors

    tensors, fields = gguf_tensors(gguf_path)
    arch = fields.get("general.architecture", "llama")
    heads, kv_heads = int(fields[f"{arch}.attention.head_count"]), int(fields[f"{arch}.attention.head_count_kv"])
    hf = read_hf_tensors(hf_dir)
    checked, skipped, worst = 0, [], (0.0, "")
    for name, kind, shape, data in tensors:
        target = hf_name(name)
        if target == "lm_head.weight" and target not in hf:
            target = "model.embed_tokens.weight"  # tied embeddings: the same matrix
        if target not in hf:
            raise KeyError(f"{hf_dir}: no tensor {target} for the GGUF's {name}")
        try:
            ref = dequantize(kind, data, shape)
        except NotImplementedError:
            skipped.append(f"{name} ({kind})")
            continue
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            ref = unpermute_rows(ref, heads if "attn_q" in name else kv_heads)
        got = hf[target].float().numpy()
        if got.shape != ref.shape:
            raise ValueError(f"{target}: shape {tuple(got.shape)} in the folder, {ref.shape} in the GGUF ({name})")
        diff = float(np.abs(got - ref).max()) if ref.size else 0.0
        if diff > VERIFY_ATOL * max(1.0, float(np.abs(ref).max())):
            raise ValueError(f"{target}: differs from the GGUF's {name} ({kind}) by up to {diff:.3e}")
        worst = max(worst, (diff, target))
        checked += 1
    return {"checked": checked, "skipped": skipped, "max_abs_diff": worst[0], "worst_tensor": worst[1]}


def verify_llama_cpp(gguf_path: str, hf_dir: str, text: str) -> Optional[Dict[str, float]]:
    """llama.cpp's logits on the GGUF vs transformers' on the folder, every position of `text`
    (None when llama-cpp-python is not installed)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = Llama(model_path=gguf_path, n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    result = {"positions": len(ids), "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
              "mean_abs_logit_diff": float((ours - theirs).abs().mean())}
    if result["top1_agreement"] < MIN_TOP1_AGREEMENT:
        raise ValueError(f"{hf_dir}: its next-token choices agree with llama.cpp's on the GGUF at only "
                         f"{result['top1_agreement']:.2f} of {len(ids)} positions (expected ≥ {MIN_TOP1_AGREEMENT})")
    return result


# ---- the conversion -------------------------------------------------------------------------------------

def _generation_config(tokenizer, fields: dict) -> dict:
    gen = {"_from_model_config": False}
    for key, field in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                       ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if field in fields:
            gen[key] = int(fields[field])
    if tokenizer.eos_token_id is not None:
        gen.setdefault("eos_token_id", tokenizer.eos_token_id)
    return gen


def gguf_to_hf(gguf_path: str, out_dir: str, dtype: str = "fp32") -> Dict[str, object]:
    """Writes the HF folder; returns what was written (tensor count, parameters, dtype, seconds)."""
    import transformers

    from .convert import _check_output, _dtype

    t0 = time.perf_counter()
    gguf_path = os.path.abspath(gguf_path)
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"--gguf: {gguf_path} is not a file")
    torch_dtype = _dtype(dtype)
    _, fields = gguf_tensors(gguf_path)
    folder, fname = os.path.split(gguf_path)
    tmp = _check_output(out_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch_dtype)
        bad = [n for n, p in model.state_dict().items() if not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"{gguf_path}: non-finite values after dequantization in {bad[:3]}")
        config = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        model.hf_quantizer, model.is_quantized = None, False  # dequantized already: plain tensors from here on
        config.name_or_path = fields.get("general.name", fname)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(_generation_config(tokenizer, fields), f, indent=2)
        with open(os.path.join(tmp, "config.json")) as f:
            saved = json.load(f)
        theta = (saved.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None and "rope_theta" not in saved:
            saved["rope_theta"] = theta  # for readers of the older key
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(saved, f, indent=2)
        os.rename(tmp, os.path.abspath(out_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(p.numel() for p in model.parameters())
    return {"out": os.path.abspath(out_dir), "tensors": len(model.state_dict()), "parameters": params, "dtype": dtype,
            "architecture": fields.get("general.architecture"), "seconds": time.perf_counter() - t0,
            "chat_template": tokenizer.chat_template is not None, "vocab": len(tokenizer)}


def greedy_text(hf_dir: str, prompt: str, max_new_tokens: int = 32) -> str:
    """The folder's greedy reply to one user message (chat template when the tokenizer has one)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="GGUF file → Hugging Face folder (safetensors, config, tokenizer, chat template)")
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="of the dequantized weights")
    p.add_argument("--prompt", default="What is 2 + 3?", help="greedy text from the result for this user message")
    p.add_argument("--verify", action="store_true",
                   help="every tensor against the GGUF dequantized by this tool's own reader (and llama.cpp's logits "
                        "when llama-cpp-python is installed)")
    a = p.parse_args(argv)
    info = gguf_to_hf(a.gguf, a.out, a.dtype)
    print(f"wrote {info['out']}: {info['architecture']}, {info['parameters'] / 1e6:.1f} M parameters in "
          f"{info['tensors']} tensors ({info['dtype']}), vocabulary {info['vocab']}, chat template "
          f"{'yes' if info['chat_template'] else 'no'}, {info['seconds']:.1f} s")
    print(f"greedy reply to {a.prompt!r}: {greedy_text(info['out'], a.prompt)!r}")
    if a.verify:
        v = verify_tensors(a.gguf, info["out"])
        print(f"verify: {v['checked']} tensors match the GGUF dequantized independently (max |difference| "
              f"{v['max_abs_diff']:.2e}, at {v['worst_tensor'] or '-'})"
              + (f"; not checked (block formats this reader lacks): {', '.join(v['skipped'])}" if v["skipped"] else ""))
        lc = verify_llama_cpp(a.gguf, info["out"], "The capital of France is Paris. 12 + 7 = 19, and 3 * 4 = 12.")
        if lc is None:
            print("verify: llama.cpp path skipped (llama-cpp-python is not installed; `pip install llama-cpp-python` "
                  "builds it from source)")
        else:
            print(f"verify: llama.cpp on the GGUF vs transformers on the folder, {lc['positions']} positions: top-1 "
                  f"agreement {lc['top1_agreement']:.3f}, mean |logit difference| {lc['mean_abs_logit_diff']:.3f}")
    return 0
