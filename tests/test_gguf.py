"""GGUF → HF (megatron_hapo.models.gguf) on a GGUF written here: a tiny Llama built in code,
quantized (Q8_0 embeddings, Q4_1 / Q4_0 matrices, F32 norms, Q/K rows permuted as llama.cpp's
converter does) with a byte-level BPE tokenizer and a chat template in its metadata. The real
SmolLM2 file is exercised by tests/test_smollm2.py where it has been fetched."""
import json
import os

import numpy as np
import pytest
import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADS, KV_HEADS, HIDDEN, FFN, LAYERS = 4, 2, 64, 128, 2


def _byte_tokens():
    """GPT-2's byte → printable-character map, the base alphabet of a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _permute(w, heads):  # llama.cpp convert_hf_to_gguf.py's Q/K permutation
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, seed=0):
    """The GGUF and the float weights it was quantized from (HF names)."""
    import gguf
    from gguf.quants import quantize

    tokens = SPECIAL + _byte_tokens() + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens)
    g = np.random.default_rng(seed)
    rnd = lambda *shape: (g.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    weights = {"model.embed_tokens.weight": rnd(vocab, HIDDEN), "model.norm.weight": 1 + rnd(HIDDEN)}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (vocab - len(SPECIAL)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)
    w.add_tensor("token_embd.weight", quantize(weights["model.embed_tokens.weight"], gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        layer = {"attn_q": ("self_attn.q_proj", rnd(HIDDEN, HIDDEN)), "attn_k": ("self_attn.k_proj", rnd(HIDDEN // 2, HIDDEN)),
                 "attn_v": ("self_attn.v_proj", rnd(HIDDEN // 2, HIDDEN)), "attn_output": ("self_attn.o_proj", rnd(HIDDEN, HIDDEN)),
                 "ffn_gate": ("mlp.gate_proj", rnd(FFN, HIDDEN)), "ffn_up": ("mlp.up_proj", rnd(FFN, HIDDEN)),
                 "ffn_down": ("mlp.down_proj", rnd(HIDDEN, FFN))}
        for gname, (hname, m) in layer.items():
            weights[p + hname + ".weight"] = m
            stored = _permute(m, HEADS if gname == "attn_q" else KV_HEADS) if gname in ("attn_q", "attn_k") else m
            kind = gguf.GGMLQuantizationType.Q4_0 if gname == "ffn_down" else gguf.GGMLQuantizationType.Q4_1
            w.add_tensor(f"blk.{i}.{gname}.weight", quantize(stored, kind), raw_dtype=kind)
        for gname, hname in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            weights[p + hname + ".weight"] = 1 + rnd(HIDDEN)
            w.add_tensor(f"blk.{i}.{gname}.weight", weights[p + hname + ".weight"])
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megatron_hapo.models import gguf as G

    root = tmp_path_factory.mktemp("gguf")
    src = str(root / "tiny.gguf")
    weights = write_tiny_gguf(src)
    info = G.gguf_to_hf(src, str(root / "hf"))
    return src, str(root / "hf"), weights, info


def test_conversion_writes_a_plain_hf_folder(converted):
    import transformers

    from megatron_hapo.models.convert import read_hf_tensors
    from megatron_hapo.models.hf_config import ModelSpec

    src, hf_dir, weights, info = converted
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert "quantization_config" not in config
    spec = ModelSpec.from_hf(hf_dir)  # the trainer reads it: a supported family, rope theta from the file
    assert (spec.family, spec.num_heads, spec.num_kv_heads, spec.tie_word_embeddings) == ("llama", HEADS, KV_HEADS, True)
    assert spec.rope_theta == 10000.0
    assert json.load(open(os.path.join(hf_dir, "generation_config.json")))["eos_token_id"] == 2
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("the the")["input_ids"]) == "the the"
    # the dequantized weights are the originals up to 4-bit rounding, rows in HF order (a Q/K
    # permutation left in place would be off by the weights' own size)
    hf = read_hf_tensors(hf_dir)
    for name, ref in weights.items():
        err = (hf[name] - torch.from_numpy(ref)).abs().max().item()
        assert err < (0.03 if "layers" in name and "norm" not in name else 2e-3), (name, err)
    assert info["parameters"] == sum(v.size for v in weights.values())


def test_verify_against_the_gguf_and_refusals(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_hapo.models import gguf as G

    src, hf_dir, _, _ = converted
    v = G.verify_tensors(src, hf_dir)
    assert v["checked"] == 1 + LAYERS * 9 + 1 and not v["skipped"] and v["max_abs_diff"] <= 1e-6
    with pytest.raises(FileExistsError):
        G.gguf_to_hf(src, hf_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(hf_dir):
        if not f.endswith(".safetensors"):
            os.symlink(os.path.join(hf_dir, f), bad / f)
    t = load_file(os.path.join(hf_dir, "model.safetensors"))
    t["model.layers.1.self_attn.k_proj.weight"] = G.torch.flip(t["model.layers.1.self_attn.k_proj.weight"], [0])
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight"):
        G.verify_tensors(src, str(bad))
    with pytest.raises(FileNotFoundError, match="--gguf"):
        G.gguf_to_hf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_dequantizer_matches_ggml_reference():
    """The module's own block decoding against gguf's dequantize on random data of every kind it reads."""
    import gguf
    from gguf.quants import dequantize as ref_dequantize, quantize

    from megatron_hapo.models.gguf import dequantize

    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    for kind in ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16"):
        q = quantize(x, getattr(gguf.GGMLQuantizationType, kind))
        ours = dequantize(kind, q, x.shape)
        theirs = ref_dequantize(q, getattr(gguf.GGMLQuantizationType, kind)).reshape(x.shape)
        assert np.array_equal(ours, theirs.astype(np.float32)), kind


def test_cli_entry(tmp_path, converted):
    import subprocess
    import sys

    src = converted[0]
    out = subprocess.run([sys.executable, "-m", "megatron_hapo.cli", "convert", "gguf-to-hf", "--gguf", src, "--out",
                          str(tmp_path / "hf"), "--verify", "--prompt", "the"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensors match the GGUF" in out.stdout and "greedy reply" in out.stdout
