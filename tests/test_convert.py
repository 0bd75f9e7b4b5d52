"""HF ↔ Megatron conversion: exact round trips, logits at TP 1/2 and PP 2, errors, atomic outputs."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from .distributed import error_text, run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ["llama", "qwen2", "qwen3"]


def roundtrip_worker(rank, world, tmp):
    from megatron_hapo.models.convert import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint, read_hf_tensors, verify

    from .tiny_models import hf_model

    out = {}
    for family in FAMILIES:
        src = f"{tmp}/{family}_hf"
        hf_model(family).save_pretrained(src, max_shard_size="100KB" if family == "qwen3" else "5GB")
        meg = hf_to_megatron_checkpoint(src, f"{tmp}/{family}_meg", progress=False)
        back = megatron_to_hf_checkpoint(meg, f"{tmp}/{family}_back", max_shard_bytes=2**30, progress=False)
        a, b = read_hf_tensors(src), read_hf_tensors(back)
        a.pop("lm_head.weight", None) if family == "qwen2" else None
        out[family] = {
            "same_names": sorted(a) == sorted(b),
            "exact": all(torch.equal(a[k], b[k]) for k in a),
            "verify": verify(src, meg),
            "config_equal": json.load(open(f"{src}/config.json")) == json.load(open(f"{back}/config.json")),
        }
    return out


def test_roundtrip_is_exact_and_logits_agree(tmp_path):
    out = run_ranks(1, roundtrip_worker, str(tmp_path), timeout=600)[0]
    for family, r in out.items():
        assert r["same_names"] and r["exact"] and r["config_equal"], (family, r)
        assert r["verify"] < 1e-4, (family, r)


def layout_worker(rank, world, tp, pp, meg, src):
    import transformers

    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.checkpoint import load_model_checkpoint
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    init_model_parallel(tp, pp)
    spec = ModelSpec.from_hf(src)
    policy = MegatronPolicy(spec, PolicyConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                               micro_batch_size=2), AlgorithmConfig.preset("dapo"))
    load_model_checkpoint(meg, policy)
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, :-1] = True
    logp, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp[:, :-1].double() - ref).abs().max().item()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_converted_checkpoint_loads_at_any_layout(tmp_path, tp, pp):
    from .tiny_models import hf_model

    src = tmp_path / "hf"
    hf_model("qwen3").save_pretrained(src)
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf", str(src), "--out", str(tmp_path / "meg"),
                          "--target-tp", str(tp), "--target-pp", str(pp), "--verify", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("verify:")][0]
    assert float(line.rsplit("=", 1)[1]) < 1e-4, line
    for diff in run_ranks(tp * pp, layout_worker, tp, pp, str(tmp_path / "meg"), str(src), timeout=600):
        assert diff < 1e-4


def errors_worker(rank, world, tmp):
    from safetensors.torch import load_file, save_file

    from megatron_hapo.models.convert import hf_to_megatron_checkpoint

    from .tiny_models import hf_model

    good = f"{tmp}/good"
    hf_model("llama").save_pretrained(good)
    tensors = load_file(f"{good}/model.safetensors")

    def variant(name, edit_tensors=None, edit_config=None):
        d = f"{tmp}/{name}"
        os.makedirs(d)
        t = dict(tensors)
        if edit_tensors:
            edit_tensors(t)
        save_file(t, f"{d}/model.safetensors")
        cfg = json.load(open(f"{good}/config.json"))
        if edit_config:
            edit_config(cfg)
        json.dump(cfg, open(f"{d}/config.json", "w"))
        return d

    cases = {
        "arch": (variant("arch", edit_config=lambda c: c.update(model_type="gpt2")), {}),
        "tp": (good, {"target_tp": 3}),
        "missing": (variant("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), {}),
        "extra": (variant("extra", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)})), {}),
        "shape": (variant("shape", lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)})), {}),
    }
    out = {}
    for label, (src, kw) in cases.items():
        target = f"{tmp}/out_{label}"
        out[label] = error_text((ValueError, KeyError, FileExistsError), hf_to_megatron_checkpoint, src, target,
                                progress=False, **kw)
        out[label + "_left_behind"] = sorted(p for p in os.listdir(tmp) if p.startswith(f"out_{label}"))
    os.makedirs(f"{tmp}/exists")
    out["exists"] = error_text(FileExistsError, hf_to_megatron_checkpoint, good, f"{tmp}/exists", progress=False)
    return out


def test_bad_input_is_named_and_nothing_is_half_written(tmp_path):
    out = run_ranks(1, errors_worker, str(tmp_path), timeout=600)[0]
    assert "model_type: 'gpt2'" in out["arch"]
    assert "tensor_model_parallel_size=3 does not divide num_attention_heads=4" in out["tp"]
    assert "lacks 1 tensors" in out["missing"] and "up_proj" in out["missing"]
    assert "model.layers.0.mlp.extra.weight" in out["extra"]
    assert "model.layers.0.self_attn.o_proj.weight: shape (64, 32)" in out["shape"] and "(64, 64)" in out["shape"]
    assert "exists" in out["exists"]
    for label in ("arch", "tp", "missing", "extra", "shape"):
        assert out[label + "_left_behind"] == [], (label, out[label + "_left_behind"])


def test_hf_assets_copy_keeps_the_chat_template_and_skips_weights(tmp_path):
    from megatron_hapo.models.convert import copy_hf_assets

    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors",
                 "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        (src / name).write_text("x")
    copy_hf_assets(str(src), str(tmp_path / "dst"))
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["chat_template.jinja", "config.json", "tokenizer.json"]
