"""The RL loop, top to bottom (docs/ARCHITECTURE.md "One step of training").

    rollout (per-token temperature from the previous step's statistics)
    → rewards (+ overlong shaping) → dynamic sampling (generate more until the batch is full)
    → old-policy pass (log-probs, entropies) → entropy statistics over the data-parallel group
    → advantages → mini-batch updates → weight sync → metrics → checkpoint

One process per rank (torchrun/srun, or a single process); every rank holds a Megatron shard and
an in-process vLLM engine. Status: the loop runs the built-in addition task end to end; data
loaders for JSONL/Parquet, TensorBoard, plots and the full demo are issue #7's remaining work.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

import torch

from . import algorithms as A
from .config import Config


def _pad_batch(rows: List[List[int]], prompt_lens: List[int], resp_lens: List[int]):
    """(input_ids, loss_mask) with one spare column so the last position scores nothing."""
    width = max(len(r) for r in rows) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, p, n) in enumerate(zip(rows, prompt_lens, resp_lens)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, p - 1: p - 1 + n] = True  # position t scores token t+1
    return ids, mask


def _per_position(values: List[List[float]], prompt_lens, shape) -> torch.Tensor:
    out = torch.zeros(shape)
    for i, (v, p) in enumerate(zip(values, prompt_lens)):
        if v:
            out[i, p - 1: p - 1 + len(v)] = torch.tensor(v)
    return out


class Trainer:
    def __init__(self, cfg: Config):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from .data import addition
        from .models.hf_config import ModelSpec
        from .rollout.engine import RolloutEngine, SamplingConfig
        from .training.parallel import init_model_parallel
        from .training.policy import MegatronPolicy, PolicyConfig

        self.cfg = cfg
        p, t, r = cfg.parallel, cfg.train, cfg.rollout
        init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=t.seed)
        cfg.validate(dist.get_world_size())
        self.algo = cfg.algo()
        self.rank = dist.get_rank()
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        os.makedirs(t.run_dir, exist_ok=True)
        model_dir = cfg.model.hf_path or os.path.join(t.run_dir, "initial_model")
        if cfg.model.hf_path is None and self.rank == 0 and not os.path.exists(os.path.join(model_dir, "config.json")):
            import transformers

            torch.manual_seed(t.seed)
            transformers.AutoModelForCausalLM.from_config(addition.tiny_model_config(), dtype=torch.float32).save_pretrained(model_dir)
        dist.barrier()
        if self.rank == 0:
            with open(os.path.join(t.run_dir, "config.yaml"), "w") as f:
                f.write(cfg.dump())
        self.task = addition
        self.spec = ModelSpec.from_hf(model_dir)
        self.policy = MegatronPolicy(self.spec, PolicyConfig(
            tensor_model_parallel_size=p.tensor_model_parallel_size, pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            use_distributed_optimizer=p.use_distributed_optimizer, micro_batch_size=t.micro_batch_size, dtype=cfg.model.dtype,
            lr=t.lr, lr_warmup_steps=t.lr_warmup_steps, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
            train_steps=t.steps, seed=t.seed), self.algo)
        from .models.convert import read_hf_tensors

        self.policy.load_hf_state_dict(read_hf_tensors(model_dir))
        self.engine = RolloutEngine(model_dir, max_model_len=self.spec.max_position_embeddings,
                                    kv_cache_memory_bytes=r.kv_cache_memory_bytes, seed=t.seed + self.dp_rank)
        self.sampling = SamplingConfig(max_tokens=r.max_response_tokens, base_temperature=r.base_temperature, top_p=r.top_p,
                                       adaptive=self.algo.adaptive_temperature, tau=self.algo.tau,
                                       sign_mode=self.algo.sign_mode, stop_token_ids=(addition.EOS,))
        self.verifier_reward = addition.reward
        self.stats: Optional[A.EntropyStats] = None
        self.step = 0
        self._maybe_resume()

    # ---- checkpoints ------------------------------------------------------------------------------

    def _ckpt_root(self):
        return os.path.join(self.cfg.train.run_dir, "checkpoints")

    def _maybe_resume(self):
        from .rollout.weight_sync import sync_policy_to_engine
        from .training.checkpoint import find_latest, load_checkpoint

        resume = self.cfg.train.resume
        path = find_latest(self._ckpt_root()) if resume == "auto" else (None if resume == "none" else resume)
        if path is None:
            return
        state = load_checkpoint(path, self.policy)
        self.step = state["step"]
        self.stats = A.EntropyStats.from_dict(state["entropy_stats"]) if state.get("entropy_stats") else None
        sync_policy_to_engine(self.policy, self.engine)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}")

    def save(self):
        from .training.checkpoint import save_checkpoint

        save_checkpoint(self._ckpt_root(), self.step, self.policy,
                        {"data_position": self.step, "entropy_stats": self.stats.to_dict() if self.stats else None,
                         "config": self.cfg.dump()}, keep_last=self.cfg.train.keep_last)

    # ---- one step --------------------------------------------------------------------------------

    def _rollout(self):
        """Whole prompt groups for this data-parallel rank, informative ones only if dynamic sampling."""
        r = self.cfg.rollout
        need = r.prompts_per_step // self.dp
        groups, generated, gen_batches = [], 0, 0
        self._raw = [0.0, 0.0]  # correct responses, responses: over everything generated, kept or not
        while len(groups) < need:
            gen_batches += 1
            if r.max_num_gen_batches and gen_batches > r.max_num_gen_batches:
                raise RuntimeError(f"dynamic sampling: only {len(groups)} of {need} informative groups after "
                                   f"{r.max_num_gen_batches} generation batches (rollout.max_num_gen_batches)")
            seed = (self.cfg.train.seed * 1_000_003 + self.step * 1009 + gen_batches) * 131 + self.dp_rank
            items = self.task.prompts(seed, need)
            out = self.engine.generate([p for p, _ in items], r.samples_per_prompt, self.sampling,
                                       self.stats if self.algo.adaptive_temperature else None,
                                       seeds=[seed + i * 7919 for i in range(need)])
            for (prompt, answer), responses in zip(items, out):
                correct = [self.verifier_reward(x.token_ids, answer) for x in responses]
                rewards = torch.tensor(correct)
                if r.overlong_buffer:
                    rewards = rewards + A.overlong_penalty([x.length for x in responses], r.max_response_tokens,
                                                           r.overlong_buffer, r.overlong_penalty_factor)
                generated += 1
                self._raw[0] += float(sum(c >= 1.0 for c in correct))
                self._raw[1] += float(len(responses))
                if not r.dynamic_sampling or bool(A.informative_groups(rewards, [0] * len(responses)).all()):
                    groups.append((prompt, responses, rewards))
        return groups[:need], generated, gen_batches

    def train_step(self) -> Dict[str, float]:
        import torch.distributed as dist

        from .parallel import distributed_entropy_stats
        from .rollout.weight_sync import sync_policy_to_engine
        from .training.policy import PolicyBatch

        t0 = time.perf_counter()
        groups, generated, gen_batches = self._rollout()
        t_rollout = time.perf_counter() - t0
        rows, plens, rlens, gids, rewards, temps, beh, eng_t1 = [], [], [], [], [], [], [], []
        for g, (prompt, responses, rw) in enumerate(groups):
            for x, reward in zip(responses, rw.tolist()):
                rows.append(list(prompt) + x.token_ids)
                plens.append(len(prompt))
                rlens.append(x.length)
                gids.append(g)
                rewards.append(reward)
                temps.append(x.temperatures)
                beh.append(x.logprobs)
                eng_t1.append(x.logprobs_t1)
        ids, mask = _pad_batch(rows, plens, rlens)
        batch = PolicyBatch(ids, mask)
        old_logp, old_ent = self.policy.compute_logprobs(batch)
        mismatch = A.logprob_mismatch(_per_position(eng_t1, plens, ids.shape), old_logp, mask)
        step_stats = distributed_entropy_stats(old_ent, mask, group=self.dp_group, pivot=self.algo.pivot)
        h_hat = A.normalized_entropy(old_ent, step_stats, self.algo.sign_mode) if self.algo.uses_entropy else None
        adv, fallback = A.compute_advantages(self.algo, torch.tensor(rewards), torch.tensor(rlens), gids)
        behaviour = _per_position(beh, plens, ids.shape) if self.algo.rollout_correction == "tis" else None

        t1 = time.perf_counter()
        per_mb = self.cfg.train.mini_batch_prompts // self.dp * self.cfg.rollout.samples_per_prompt
        train_metrics = []
        for start in range(0, len(rows), per_mb):
            sl = slice(start, start + per_mb)
            train_metrics.append(self.policy.train_step(PolicyBatch(
                ids[sl], mask[sl], advantages=adv[sl], old_logp=old_logp[sl],
                h_hat=None if h_hat is None else h_hat[sl], behaviour_logp=None if behaviour is None else behaviour[sl])))
        t_train = time.perf_counter() - t1
        sync = sync_policy_to_engine(self.policy, self.engine)
        self.stats = step_stats  # the next step's rollout samples with these
        self.step += 1

        tvals = torch.tensor([t for ts in temps for t in ts]) if any(temps) else torch.ones(1)
        local = torch.tensor([sum(rewards), float(len(rewards)), float(sum(r >= 1.0 for r in rewards)), float(sum(rlens)),
                              float(generated), *self._raw], dtype=torch.float64)
        dist.all_reduce(local, group=self.dp_group)
        m = {k: sum(x[k] for x in train_metrics) / len(train_metrics) for k in train_metrics[0]}
        m.update(step=self.step, reward=local[0].item() / local[1].item(), accuracy=local[2].item() / local[1].item(),
                 rollout_accuracy=local[5].item() / max(local[6].item(), 1.0),
                 response_length=local[3].item() / local[1].item(), keep_rate=len(groups) * self.dp / max(local[4].item(), 1),
                 gen_batches=gen_batches, temperature_min=tvals.min().item(), temperature_mean=tvals.mean().item(),
                 temperature_max=tvals.max().item(), entropy_q=step_stats.q, adv_fallback_frac=fallback.float().mean().item(),
                 time_rollout=t_rollout, time_train=t_train, **mismatch, **sync)
        return m

    def evaluate(self, n: int = 200, seed: int = 12345) -> float:
        """Greedy accuracy on held-out prompts (adaptation off)."""
        items = self.task.prompts(seed, n)
        outs = self.engine.greedy([p for p, _ in items], self.cfg.rollout.max_response_tokens, (self.task.EOS,))
        return sum(self.verifier_reward(o, a) for o, (_, a) in zip(outs, items)) / n

    def supervised_warmup(self, steps: int, batch_size: int = 64, seed: int = 777) -> List[float]:
        """Teacher-forced warm-up on gold answers through the same Megatron update: with a fresh
        old-policy pass each step the ratio is 1 and the loss with A = 1 has the gradient of the
        token-mean negative log-likelihood."""
        from .rollout.weight_sync import sync_policy_to_engine
        from .training.policy import PolicyBatch

        losses = []
        for k in range(steps):
            items = self.task.prompts(seed * 100_003 + k, batch_size)
            answers = [self.task.encode(a) + [self.task.EOS] for _, a in items]
            ids, mask = _pad_batch([p + a for (p, _), a in zip(items, answers)], [len(p) for p, _ in items],
                                   [len(a) for a in answers])
            batch = PolicyBatch(ids, mask)
            old, _ = self.policy.compute_logprobs(batch)
            m = self.policy.train_step(PolicyBatch(ids, mask, advantages=torch.ones(len(items)), old_logp=old,
                                                   h_hat=torch.zeros(ids.shape) if self.algo.uses_entropy else None))
            losses.append(-old[mask].mean().item())
        sync_policy_to_engine(self.policy, self.engine)
        return losses

    def export_hf(self, path: str) -> None:
        """The current weights as a HF folder (rank 0 writes)."""
        import torch.distributed as dist
        from safetensors.torch import save_file

        weights = self.policy.hf_state_dict()
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"))
            self.task.tiny_model_config().save_pretrained(path) if self.cfg.model.hf_path is None else None
        dist.barrier()

    def close(self) -> None:
        from .training.parallel import destroy_model_parallel

        del self.engine
        destroy_model_parallel()

    def fit(self) -> List[Dict[str, float]]:
        t = self.cfg.train
        history = []
        path = os.path.join(t.run_dir, "metrics.jsonl")
        while self.step < t.steps:
            m = self.train_step()
            history.append(m)
            if self.rank == 0:
                with open(path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                print(f"step {self.step:>4} reward {m['reward']:.3f} acc {m['rollout_accuracy']:.3f} (kept {m['accuracy']:.3f}) entropy {m['entropy']:.3f} "
                      f"T [{m['temperature_min']:.3f}, {m['temperature_max']:.3f}] clip {m['clip_frac_low']:.3f}/"
                      f"{m['clip_frac_high']:.3f} mismatch {m['logp_mismatch_mean']:.1e} keep {m['keep_rate']:.2f}", flush=True)
            if (t.save_interval and self.step % t.save_interval == 0) or self.step == t.steps:
                self.save()
        return history


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="megatron-hapo train: the RL loop")
    p.add_argument("--config", default=None, help="YAML config (optional)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    a = p.parse_args(argv)
    cfg = Config.load(a.config, a.overrides)
    trainer = Trainer(cfg)
    if trainer.rank == 0:
        print(cfg.dump())
    trainer.fit()
    return 0
