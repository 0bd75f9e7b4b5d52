"""Megatron policy behaviours on one process: skipped steps, packing, TIS, loss-side entropy modes,
LR warm-up, and configuration errors that name the setting."""
import pytest
import torch

from megatron_hapo.models.hf_config import ModelSpec, check_layout
from megatron_hapo.training.batch import PolicyBatch, num_micro_batches

from .distributed import run_ranks
from .tiny_models import hf_config


def make_policy(algo="hapo", family="qwen2", **cfg_overrides):
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(1, 1)
    hf = hf_model(family)
    algo_overrides = cfg_overrides.pop("algo_overrides", {})
    cfg = PolicyConfig(**{"micro_batch_size": 2, "lr": 1e-3, "lr_warmup_steps": 0, **cfg_overrides})
    policy = MegatronPolicy(ModelSpec.from_hf(hf.config), cfg, AlgorithmConfig.preset(algo, **algo_overrides))
    policy.load_hf_state_dict(hf.state_dict())
    return policy


def batch(seed=0, b=4, s=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (b, s), generator=g)
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[:, 3:s - 1] = True
    return ids, mask


def behaviour_worker(rank, world):
    from megatron_hapo.algorithms import entropy_stats, normalized_entropy

    out = {}
    ids, mask = batch()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])

    # 1. a non-finite gradient norm skips the step and leaves the weights untouched
    policy = make_policy("dapo")
    before = {k: v.clone() for k, v in policy.hf_state_dict().items()}
    old, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    m = policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, float("nan"), 0.5, -0.5]), old_logp=old))
    after = policy.hf_state_dict()
    out["skipped"] = m["skipped"]
    out["unchanged_after_skip"] = all(torch.equal(before[k], after[k]) for k in before)
    m = policy.train_step(PolicyBatch(ids, mask, advantages=adv, old_logp=old))
    out["recovered"] = (m["skipped"], m["grad_norm"])

    # 2. packed rows give the same log-probs as padded rows
    a, b = ids[0, :7], ids[1, :5]
    packed = torch.cat([a, b]).view(1, -1)
    seg = torch.tensor([0] * 7 + [1] * 5).view(1, -1)
    pmask = torch.zeros(1, 12, dtype=torch.bool)
    pmask[0, 2:6] = True  # positions scoring a's tokens 3..6
    pmask[0, 8:11] = True  # b's tokens 1..3 (position 6 would score b's first token across the boundary)
    lp_packed, ent_packed = policy.compute_logprobs(PolicyBatch(packed, pmask, segment_ids=seg))
    pad = torch.zeros(2, 7, dtype=torch.long)
    pad[0], pad[1, :5] = a, b
    pad_mask = torch.zeros(2, 7, dtype=torch.bool)
    pad_mask[0, 2:6] = True
    pad_mask[1, 1:4] = True
    lp_pad, ent_pad = policy.compute_logprobs(PolicyBatch(pad, pad_mask))
    out["packed"] = (torch.cat([lp_packed[0, 2:6], lp_packed[0, 8:11]]), torch.cat([lp_pad[0, 2:6], lp_pad[1, 1:4]]))
    out["packed_entropy"] = (torch.cat([ent_packed[0, 2:6], ent_packed[0, 8:11]]), torch.cat([ent_pad[0, 2:6], ent_pad[1, 1:4]]))

    # 3. a rollout correction with behaviour = old log-probs (weights 1) is the plain loss
    losses = {}
    for tis in (None, "tis", "icepop", "seq-mis", "geo-rs"):
        from megatron_hapo.training.parallel import destroy_model_parallel

        destroy_model_parallel()
        policy = make_policy("dapo", algo_overrides={"rollout_correction": tis})
        old, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
        m = policy.train_step(PolicyBatch(ids, mask, advantages=adv, old_logp=old, behaviour_logp=old))
        losses[tis] = (m["loss"], m["grad_norm"])
    out["tis"] = losses

    # 4. both loss-side entropy modes run and change advantages; micro_batch_current needs no h_hat
    for mode in ("step_old", "micro_batch_current"):
        destroy_model_parallel()
        policy = make_policy("hapo", algo_overrides={"loss_stats": mode})
        old, ent = policy.compute_logprobs(PolicyBatch(ids, mask))
        h = normalized_entropy(ent, entropy_stats(ent, mask)) if mode == "step_old" else None
        m = policy.train_step(PolicyBatch(ids, mask, advantages=adv, old_logp=old, h_hat=h))
        out[mode] = m

    # 5. LR warm-up: step k of W uses lr·k/W
    destroy_model_parallel()
    policy = make_policy("dapo", lr_warmup_steps=4, lr=1e-3)
    old, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    out["lrs"] = [policy.train_step(PolicyBatch(ids, mask, advantages=adv, old_logp=old))["lr"] for _ in range(5)]
    # counted in rollout steps (the authors' verl): constant within a rollout step, the first one at lr 0
    destroy_model_parallel()
    policy = make_policy("dapo", lr_warmup_steps=2, lr=1e-3, lr_warmup_unit="rollout_steps")
    out["rollout_lrs"] = []
    for _ in range(3):
        out["rollout_lrs"] += [policy.train_step(PolicyBatch(ids, mask, advantages=adv, old_logp=old))["lr"] for _ in range(2)]
        policy.end_rollout_step()

    # 6. bad settings at start-up
    from megatron_hapo.training.parallel import init_model_parallel

    errors = {}
    for label, call in {
        "world": lambda: init_model_parallel(2, 1),
        "micro": lambda: policy.train_step(PolicyBatch(ids[:3], mask[:3], advantages=adv[:3], old_logp=old[:3])),
        "step_old": lambda: make_policy("hapo").train_step(PolicyBatch(ids, mask, advantages=adv, old_logp=old)),
    }.items():
        try:
            call()
            errors[label] = None
        except (ValueError, KeyError) as exc:
            errors[label] = str(exc)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(1, behaviour_worker, timeout=600)[0]


def test_non_finite_gradient_skips_the_step(results):
    assert results["skipped"] == 1.0 and results["unchanged_after_skip"]
    skipped, norm = results["recovered"]
    assert skipped == 0.0 and norm == norm and norm > 0


def test_packed_rows_match_padded_rows(results):
    for got, want in (results["packed"], results["packed_entropy"]):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_tis_with_matching_behaviour_is_the_plain_loss(results):
    plain = results["tis"][None]
    for kind in ("tis", "icepop", "seq-mis", "geo-rs"):
        got = results["tis"][kind]
        assert got[0] == pytest.approx(plain[0], rel=1e-6) and got[1] == pytest.approx(plain[1], rel=1e-6), kind


def test_loss_side_entropy_modes(results):
    for mode in ("step_old", "micro_batch_current"):
        m = results[mode]
        assert m["skipped"] == 0.0 and m["hapo_adv_changed_frac"] > 0 and m["hapo_bounds_changed_frac"] > 0, (mode, m)
        for k in ("loss", "entropy", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "grad_norm", "tokens_per_s"):
            assert k in m


def test_lr_warmup(results):
    assert results["lrs"] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])  # optimizer steps
    assert results["rollout_lrs"] == pytest.approx([0, 0, 5e-4, 5e-4, 1e-3, 1e-3])  # rollout steps, 2 updates each


def test_bad_settings_name_the_culprit(results):
    e = results["errors"]
    assert "tensor_model_parallel_size" in e["world"]
    assert "micro_batch_size=2" in e["micro"]
    assert "h_hat" in e["step_old"]


@pytest.mark.parametrize(
    "tp, pp, overrides, match",
    [
        (3, 1, {}, "does not divide num_attention_heads=4"),
        (4, 1, {}, "does not divide num_key_value_heads=2"),
        (2, 1, {"intermediate_size": 97}, "intermediate_size=97"),
        (1, 3, {}, "exceeds num_hidden_layers=2"),
        (1, 2, {"num_hidden_layers": 3}, "does not divide num_hidden_layers=3"),
    ],
)
def test_layout_errors(tp, pp, overrides, match):
    spec = ModelSpec.from_hf(hf_config("llama", **overrides))
    with pytest.raises(ValueError, match=match):
        check_layout(spec, tp, pp)


def test_micro_batch_and_batch_errors():
    with pytest.raises(ValueError, match="micro_batch_size=3 does not divide the batch of 8"):
        num_micro_batches(8, 3)
    ids, mask = batch()
    with pytest.raises(ValueError, match="loss_mask: shape"):
        PolicyBatch(ids, mask[:, :-1])
    bad = mask.clone()
    bad[:, -1] = True
    with pytest.raises(ValueError, match="last position"):
        PolicyBatch(ids, bad)
    with pytest.raises(ValueError, match="model_type"):
        ModelSpec.from_hf({"model_type": "gpt2"})
