"""The RL loop as orchestration (docs/ARCHITECTURE.md "One step"): every collective lives in the
pieces it calls.

    rollout (the rollout source: generate with the previous step's entropy statistics, score,
    dynamic sampling, exchange) → old-policy pass (log-probs, entropies) → entropy statistics over
    the data-parallel group → advantages → mini-batch updates (the algorithm's PolicyLoss inside
    Megatron's schedules) → publish the new version (weights and statistics) → metrics →
    evaluation / checkpoint every K steps

SPMD over the trainer ranks (torchrun/srun, or a single process). Where the rollouts come from is the
rollout source's business (`rollout/source.py`): colocated engines on these ranks, or engine ranks of
their own under rollout.placement=separate, which never build a Trainer (`train.run` serves them).
The trainer calls the same methods whatever the placement.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch.distributed as dist
from megatron.core import parallel_state as ps

from . import algorithms as A
from . import device as dev
from .config import Config
from .data.datasets import resolve_model_dir
from .metrics import RunLogger, eval_metrics, mean_over_micro_batches, progress_bar, reduce_step_sums, rollout_metrics
from .models.convert import read_hf_tensors, save_hf_folder
from .parallel import distributed_entropy_stats
from .rollout.source import PolicyVersion, open_source
from .training import checkpoint as ckpt
from .training.parallel import control_group, current_roles, destroy_model_parallel, init_model_parallel
from .training.policy import MegatronPolicy, PolicyBatch, PolicyConfig
from .training import stop as phases
from .training.stop import StopRequest


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        p, t, r, d = cfg.parallel, cfg.train, cfg.rollout, cfg.data
        roles = current_roles(cfg)  # rollout.placement=separate: the launch's split (engine ranks never get here)
        alloc_note = dev.check_allocator_config(r.enable_sleep_mode)  # before CUDA starts
        init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=t.seed,
                            timeout_s=p.timeout_s, control_timeout_s=p.control_timeout_s,
                            ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size)
        self.device, self.control = dev.device(), control_group()  # gloo, long timeout: waits for the slowest engine
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        cfg.validate(self.world)
        self.algo = cfg.algorithm
        if alloc_note and self.rank == 0:
            print(alloc_note, flush=True)
        self.dp_group = ps.get_data_parallel_group()
        os.makedirs(t.run_dir, exist_ok=True)
        self.progress = self.rank == 0 and (cfg.log.progress == "on" or (cfg.log.progress == "auto" and sys.stderr.isatty()))

        self.model_dir = resolve_model_dir(cfg.model.hf_path, d.train, t.run_dir, t.seed, self.rank)
        self.source = open_source(cfg, roles, self.model_dir, self.control, ps.get_data_parallel_world_size(),
                                  ps.get_data_parallel_rank(), self.progress)
        inputs = self.source.inputs
        self.tokenizer, self.spec, self.stop_ids = inputs.tokenizer, inputs.spec, inputs.stop_ids
        self.train_data, self.eval_data, self.sampler = inputs.train_data, inputs.eval_data, inputs.sampler
        self.data_position = 0
        self.policy = MegatronPolicy(self.spec, PolicyConfig.from_config(cfg), self.algo)
        self._load_initial_weights()
        self.source.open()  # colocated: the engine, after the policy
        self.stats: Optional[A.EntropyStats] = None
        self.step = 0
        self.logger = RunLogger(t.run_dir, cfg.log.tensorboard, cfg.log.token_samples, enabled=self.rank == 0)
        self.stop = StopRequest(t.run_dir, self.control)
        self._maybe_resume()  # the engines start at the first rollout, evaluation or sync
        if self.rank == 0:
            with open(os.path.join(t.run_dir, "config.yaml"), "w") as f:
                f.write(cfg.dump())
            for ds in (self.train_data, self.eval_data):
                if ds is not None:
                    print(ds.summary(), flush=True)

    # ---- set-up -------------------------------------------------------------------------------------

    def _load_initial_weights(self) -> None:
        if self.cfg.model.load:
            ckpt.load_model_checkpoint(self.cfg.model.load, self.policy)
        else:
            self.policy.load_hf_state_dict(read_hf_tensors(self.model_dir))

    def _version(self) -> PolicyVersion:
        return PolicyVersion(self.step, self.stats)

    def sync_weights(self) -> Dict[str, float]:
        """The policy's weights into the engines now, as the current version (after a warm-up in this
        process, say)."""
        return self.source.sync(self.policy, self._version(), self.data_position)

    def _start_engines(self) -> Dict[str, float]:
        """The engines' first version: the policy's weights as they are at the first rollout, evaluation
        or sync, from the data position (or where a checkpoint's kept rollouts leave off). Idempotent."""
        return self.source.start(self.policy, self._version(), self.data_position)

    def tool_format(self):
        """The run's multi-turn format (rollout.tools or rollout.environment), else None: what the supervised
        warm-up writes calls and replies in."""
        from .rollout.tools import format_for_run

        return format_for_run(self.cfg.rollout, self.tokenizer)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _maybe_resume(self) -> None:
        """Loads the checkpoint train.resume names (and the rollout source what it kept there)."""
        resume = self.cfg.train.resume
        root = os.path.join(self.cfg.train.run_dir, "checkpoints")
        path = ckpt.find_latest(root) if resume == "auto" else (None if resume == "none" else resume)
        if path is None:
            self.logger.rewind(0)  # rows of an attempt killed before its first checkpoint
            return
        state = ckpt.load_checkpoint(path, self.policy)
        self.step, self.data_position = state["step"], int(state.get("data_position", 0))
        self.logger.rewind(self.step)
        self.stats = A.EntropyStats.from_dict(state["entropy_stats"]) if state.get("entropy_stats") else None
        self.source.restore(path)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step} (data position {self.data_position})", flush=True)

    def save(self) -> None:
        phases.mark("checkpoint")
        ckpt.save_checkpoint(os.path.join(self.cfg.train.run_dir, "checkpoints"), self.step, self.policy,
                             {"data_position": self.data_position,
                              "entropy_stats": self.stats.to_dict() if self.stats else None, "config": self.cfg.dump()},
                             keep_last=self.cfg.train.keep_last, blobs=self.source.checkpoint_blobs(self.step))

    # ---- one step ---------------------------------------------------------------------------------------

    def train_step(self) -> Dict[str, Any]:
        t0, memory = time.perf_counter(), {}
        phases.set_step(self.step + 1)
        phases.mark("rollout")
        self._start_engines()
        stats = self.stats if self.algo.adaptive_temperature else None  # the temperatures' statistics
        batch, self.data_position, record = self.source.collect(self.step + 1, self.data_position, stats)
        t1 = self._phase("rollout", t0, memory)
        self.source.release_memory()
        phases.mark("old_pass")
        train, step_stats, old_metrics = self._old_pass(batch)
        t2 = self._phase("old_pass", t1, memory)
        phases.mark("update")
        parts = self._update(train)
        t3 = self._phase("update", t2, memory, "time_train")
        phases.mark("weight_sync")
        # the next version, with the statistics its rollouts take their temperatures from
        sync = self.source.publish(self.policy, PolicyVersion(self.step + 1, step_stats))
        self._phase("weight_sync", t3, memory)  # its time: the sync's own, below
        self.stats, self.step = step_stats, self.step + 1  # the next step's rollout samples with these statistics
        m: Dict[str, Any] = {"step": self.step, **mean_over_micro_batches(parts),
                             **rollout_metrics(batch.kept, batch.seen, batch.gen_batches), **old_metrics,
                             **step_stats.metrics(), **memory, **self._data_metrics(), **self.policy.take_padding_factor(),
                             "time_weight_sync": sync["weight_sync_s"], "weight_sync_bytes": sync["weight_sync_bytes"],
                             "time_step": time.perf_counter() - t0}
        m.update(self.source.step_metrics(record, self.step, batch, m))
        return m

    def _old_pass(self, batch):
        """The old policy's log-probs and entropies (and at the engine's recorded T), the step's
        entropy statistics, h-hat and advantages: the update's batch, the statistics, and the pass's
        metrics (trainer-vs-engine mismatch, GRPO fallback, MoE routing mismatch under replay). With
        rollout.old_logprobs=engine the engine's records stand in for the pass (no mismatch metrics)."""
        algo = self.algo
        ids, mask = batch.padded(self.device)
        width, temps = ids.shape[1], batch.per_position("temperatures", ids.shape[1], self.device)
        engine_logp = batch.per_position("logprobs", width, self.device)  # at the recorded T: TIS's behaviour too
        routing = batch.per_position_routing(width, self.device)  # rollout.routing_replay: the engine's experts
        bypass = self.cfg.rollout.old_logprobs == "engine"
        if bypass:  # no old pass: the engine's records are π_old (at T_b) and the entropies (at T = 1)
            old_logp, old_ent = engine_logp, batch.per_position("entropies", width, self.device)
            mismatch = mismatch_at_t = None  # nothing to compare with
        else:
            old_logp, old_ent, logp_at_t = self.policy.compute_logprobs(PolicyBatch(ids, mask, routing=routing),
                                                                        also_at=temps)
            # engine vs trainer numerics: only at tokens sampled under the weights this pass runs (separate
            # placement: a token of an older version differs by the policy's own change, which the
            # rollout correction's metrics show)
            same = mask if batch.versions is None else mask & (batch.per_position("versions", width, self.device) == self.step)
            mismatch = A.logprob_mismatch_sums(batch.per_position("logprobs_t1", width, self.device), old_logp, same)
            mismatch_at_t = A.logprob_mismatch_sums(engine_logp, logp_at_t, same)
        step_stats = distributed_entropy_stats(old_ent, mask, group=self.dp_group, pivot=algo.pivot)
        h_hat = A.normalized_entropy(old_ent, step_stats, algo.sign_mode) if algo.uses_entropy else None
        adv, fallback = A.compute_advantages(algo, batch.rewards.to(self.device), batch.lengths.to(self.device),
                                             batch.group_ids)
        train = PolicyBatch(ids, mask, advantages=adv, old_logp=old_logp, h_hat=h_hat, routing=routing,
                            behaviour_logp=engine_logp if algo.rollout_correction is not None else None,
                            temperature=temps if bypass else None)  # the ratio at the temperature π_old was taken at
        metrics = reduce_step_sums(mismatch, mismatch_at_t, fallback, self.dp_group)
        routing_mismatch = self.policy.take_routing_mismatch()
        if routing_mismatch is not None:
            metrics["moe_routing_mismatch"] = routing_mismatch  # the old pass's own routing vs the rollout's, replayed
        if self.logger.enabled:  # rank 0: the other ranks would copy these to the host for nothing
            self.logger.log_distributions(self.step + 1, {
                "h_hat": None if h_hat is None else h_hat[mask].cpu(), "entropy": old_ent[mask].cpu(),
                "temperature": temps[mask].cpu()}, batch.model_values("entropies"), batch.model_values("temperatures"))
        return train, step_stats, metrics

    def _update(self, train: PolicyBatch) -> List[Dict[str, float]]:
        """The mini-batch updates of the step (train.mini_batch_prompts prompts each); their metrics."""
        per_mb = self.cfg.train.mini_batch_prompts // self.source.layout.dp * self.cfg.rollout.samples_per_prompt
        n = train.size
        bar, parts = progress_bar(self.progress, f"step {self.step + 1} update", -(-n // per_mb)), []
        for sl in (slice(i, i + per_mb) for i in range(0, n, per_mb)):
            parts.append(self.policy.train_step(train.select(sl)))
            bar.update(1)
        bar.close()
        self.policy.end_rollout_step()
        return parts

    def _phase(self, name: str, start: float, memory: Dict[str, float], time_key: Optional[str] = None) -> float:
        """Records the phase's time and the device memory after it (GiB; empty on CPU); returns now."""
        now = time.perf_counter()
        memory[time_key or f"time_{name}"] = now - start
        memory.update({f"mem_{name}_{k}": v for k, v in dev.memory_report().items()})
        return now

    def _data_metrics(self) -> Dict[str, float]:
        return {"data_position": self.data_position, "data_epoch": self.data_position / len(self.train_data),
                "data_skipped_rows": self.train_data.skipped}

    # ---- evaluation, export ---------------------------------------------------------------------------------

    def evaluate(self, num_prompts: Optional[int] = None) -> Dict[str, float]:
        """mean@n and pass@n on the first `num_prompts` of the eval set (None: eval.num_prompts; 0: all)
        with adaptation off (greedy at temperature 0)."""
        self._start_engines()
        e = self.cfg.eval
        if self.eval_data is None:
            raise ValueError("evaluation needs data.eval (no held-out split for these training sources)")
        n = e.num_prompts if num_prompts is None else num_prompts  # 0: the whole set
        count = min(n or len(self.eval_data), len(self.eval_data))
        t0 = time.perf_counter()
        groups = self.source.evaluate(count, e.n)
        sources = [self.eval_data[g.position].source for g in groups]
        return {**eval_metrics(groups, e.n, sources), "time_eval": time.perf_counter() - t0}

    def export_hf(self, path: str) -> None:
        """The current weights as an HF folder with the model's config and tokenizer (rank 0 writes; a
        barrier over the trainer ranks, so every rank returns once it is written)."""
        save_hf_folder(self.policy.hf_weights(), self.spec, path, self.model_dir, write=self.rank == 0, overwrite=True)
        dist.barrier()

    def close(self) -> None:
        """Ordered shutdown, so that several trainers can run one after another in a process (the demo,
        `compare`): the rollout source (colocated: reward workers, then the engine; separate: the
        engine ranks are told to stop), writers, then Megatron's groups (the job's process group stays)."""
        self.source.close()
        self.logger.close()
        destroy_model_parallel()

    # ---- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> List[Dict[str, Any]]:
        """Trains to train.steps (or until a stop request: then a checkpoint at the next safe point
        and a normal return; the next launch resumes there with train.resume=auto)."""
        t, e = self.cfg.train, self.cfg.eval
        self._start_engines()
        history = []
        self.stop.install()
        if e.before_train and self.step == 0 and self.eval_data is not None:
            self.logger.log({"step": 0, **self.evaluate()}, echo="eval")
        while self.step < t.steps:
            m = self.train_step()
            last = self.step == t.steps
            if self.eval_data is not None and ((e.interval and self.step % e.interval == 0) or (last and e.at_end)):
                m.update(self.evaluate(e.final_num_prompts if last else None))
            history.append(m)
            self.logger.log(m)
            saved = (t.save_interval and self.step % t.save_interval == 0) or last
            if saved:
                self.save()
            reason = self.stop.requested() if not last else None
            if reason:
                if not saved:
                    self.save()
                if self.rank == 0:
                    self.stop.consume()  # the resumed run must not stop at once
                    print(f"stop requested ({reason}): saved a checkpoint at step {self.step}; resume with "
                          f"train.resume=auto", flush=True)
                break
        return history
