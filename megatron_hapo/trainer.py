"""The RL loop as orchestration (docs/ARCHITECTURE.md "One step"): every collective lives in the
pieces it calls.

    rollout (rollout/collect.py: generate with the previous step's entropy statistics, score,
    dynamic sampling, exchange) → old-policy pass (log-probs, entropies) → entropy statistics over
    the data-parallel group → advantages → mini-batch updates (the algorithm's PolicyLoss inside
    Megatron's schedules) → weight sync → metrics → evaluation / checkpoint every K steps

SPMD: one process per rank (torchrun/srun, or a single process). Every rank holds a Megatron shard
and a share of a colocated vLLM engine: one engine per inference-TP group (`rollout/engine.py`).
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
from .rollout.collect import Layout
from .rollout.weight_sync import sync_policy_to_engine
from .training import checkpoint as ckpt
from .training.parallel import control_group, destroy_model_parallel, init_model_parallel, init_roles
from .training.policy import MegatronPolicy, PolicyBatch, PolicyConfig
from .training import stop as phases
from .training.stop import StopRequest

ROLLOUT_STATE = "rollout_state.pkl"  # separate placement: what the engines had made ahead, in the checkpoint


class Trainer:
    def __init__(self, cfg: Config):
        from .rollout.assemble import rollout_side, run_inputs

        self.cfg = cfg
        p, t, r, d = cfg.parallel, cfg.train, cfg.rollout, cfg.data
        # rollout.placement=separate: this launch's last rollout.engine_ranks ranks serve rollouts only
        self.roles = init_roles(r.engine_ranks, p.timeout_s, p.control_timeout_s) if r.placement == "separate" else None
        self.worker = self.remote = None
        if self.roles is not None and not self.roles.is_trainer:
            from .rollout.remote import EngineWorker

            self.rank, self.step, self.logger = self.roles.launch_rank, 0, None
            self.worker = EngineWorker(cfg, self.roles)
            return
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
        itp = p.inference_tensor_parallel_size
        if self.roles is None:
            layout = Layout(self.world, self.rank, self.world // itp, self.rank // itp, self.rank % itp == 0,
                            ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
        else:  # no engine here: the layout places only this rank's data-parallel share
            layout = Layout(self.world, self.rank, max(r.engine_ranks // itp, 1), 0, False,
                            ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
        os.makedirs(t.run_dir, exist_ok=True)

        self.model_dir = resolve_model_dir(cfg.model.hf_path, d.train, t.run_dir, t.seed, self.rank)
        if self.roles is not None:
            from .rollout.remote import RemoteRollout  # the engine ranks build their engines meanwhile

            self.remote = RemoteRollout(cfg, self.roles, self.model_dir, layout, self.control)
        inputs = run_inputs(cfg, self.model_dir)
        self.tokenizer, self.spec, self.stop_ids = inputs.tokenizer, inputs.spec, inputs.stop_ids
        self.train_data, self.eval_data, self.sampler = inputs.train_data, inputs.eval_data, inputs.sampler
        self.data_position = 0
        self.policy = MegatronPolicy(self.spec, PolicyConfig.from_config(cfg), self.algo)
        self._load_initial_weights()
        if self.remote is None:
            self.engine, self.rewards, self.collector, self.sampling = rollout_side(cfg, inputs, layout, self.control)
        else:
            self.engine = self.rewards = None
            self.collector = self.remote.collector
        self.stats: Optional[A.EntropyStats] = None
        self.step = 0
        self.logger = RunLogger(t.run_dir, cfg.log.tensorboard, cfg.log.token_samples, enabled=self.rank == 0)
        self.stop = StopRequest(t.run_dir, self.control)
        self.progress = self.rank == 0 and (cfg.log.progress == "on" or (cfg.log.progress == "auto" and sys.stderr.isatty()))
        if cfg.model.load and self.remote is None:
            self.sync_weights()
        self._rollout_state = self._maybe_resume()  # separate placement: the engines start at the first use
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

    def _bar(self, desc: str, total: int):
        return progress_bar(self.progress, desc, total)

    def sync_weights(self) -> Dict[str, float]:
        """The policy's weights into the engines (separate placement: as the current version again,
        with the statistics of the step that made it)."""
        if self.remote is not None:
            return self.remote.sync(self.policy, self.step, self.stats) if self.remote.started else self._start_engines()
        return sync_policy_to_engine(self.policy, self.engine)

    def _start_engines(self) -> Dict[str, float]:
        """Separate placement: the engines' first version, the policy's weights as they are at the first
        rollout, evaluation or sync (after a warm-up in this process, say), with where the engines start
        (the checkpoint's rollouts made ahead, or the data position). Idempotent."""
        if self.remote is None or self.remote.started:
            return {}
        return self.remote.start(self.policy, self.step, self.stats, self._rollout_state, self.data_position)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _maybe_resume(self) -> Optional[dict]:
        """Loads the checkpoint train.resume names; returns what separate placement kept in it for the
        engines (the rollouts made ahead), on trainer 0."""
        resume = self.cfg.train.resume
        root = os.path.join(self.cfg.train.run_dir, "checkpoints")
        path = ckpt.find_latest(root) if resume == "auto" else (None if resume == "none" else resume)
        if path is None:
            self.logger.rewind(0)  # rows of an attempt killed before its first checkpoint
            return None
        state = ckpt.load_checkpoint(path, self.policy)
        self.step, self.data_position = state["step"], int(state.get("data_position", 0))
        self.logger.rewind(self.step)
        self.stats = A.EntropyStats.from_dict(state["entropy_stats"]) if state.get("entropy_stats") else None
        if self.remote is None:
            self.sync_weights()
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step} (data position {self.data_position})", flush=True)
        return ckpt.read_blob(path, ROLLOUT_STATE) if self.rank == 0 else None

    def save(self) -> None:
        phases.mark("checkpoint")
        blobs = {}
        if self.remote is not None and self.rank == 0:
            blobs[ROLLOUT_STATE] = self.remote.checkpoint_state(self.step)
        ckpt.save_checkpoint(os.path.join(self.cfg.train.run_dir, "checkpoints"), self.step, self.policy,
                        {"data_position": self.data_position, "entropy_stats": self.stats.to_dict() if self.stats else None,
                         "config": self.cfg.dump()}, keep_last=self.cfg.train.keep_last, blobs=blobs)

    # ---- one step ---------------------------------------------------------------------------------------

    def train_step(self) -> Dict[str, Any]:
        t0, memory = time.perf_counter(), {}
        phases.set_step(self.step + 1)
        phases.mark("rollout")
        batch, schedule = self._collect()
        t1 = self._phase("rollout", t0, memory)
        if self.remote is None:
            self.engine.sleep()  # with rollout.enable_sleep_mode on GPU; a no-op otherwise
        phases.mark("old_pass")
        train, step_stats, old_metrics = self._old_pass(batch)
        t2 = self._phase("old_pass", t1, memory)
        phases.mark("update")
        parts = self._update(train)
        t3 = self._phase("update", t2, memory, "time_train")
        phases.mark("weight_sync")
        if self.remote is None:
            self.engine.wake_up_weights()  # staged: weights, the sync, then the KV cache
            sync = self.sync_weights()
            self.engine.wake_up_kv_cache()
        else:  # the next version, with the statistics its rollouts take their temperatures from
            sync = self.remote.sync(self.policy, self.step + 1, step_stats)
        self._phase("weight_sync", t3, memory)  # its time: the sync's own, below
        self.stats, self.step = step_stats, self.step + 1  # the next step's rollout samples with these statistics
        m: Dict[str, Any] = {"step": self.step, **mean_over_micro_batches(parts),
                             **rollout_metrics(batch.kept, batch.seen, batch.gen_batches), **old_metrics,
                             **step_stats.metrics(), **memory, **self._data_metrics(), **self.policy.take_padding_factor(),
                             "time_weight_sync": sync["weight_sync_s"], "weight_sync_bytes": sync["weight_sync_bytes"],
                             "time_step": time.perf_counter() - t0}
        generation_s = m["time_rollout"]
        if schedule is not None:  # separate placement: the engines' side of the step, staleness, idle shares
            m.update(self.remote.schedule_metrics(schedule, self.step, batch))
            generation_s = m["time_generate"]
            m["trainer_idle_frac"] = m["time_rollout_wait"] / max(m["time_step"], 1e-9)
        m["rollout_tokens_per_s"] = m["response_tokens"] / max(generation_s, 1e-9)
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
        per_mb = self.cfg.train.mini_batch_prompts // self.collector.layout.dp * self.cfg.rollout.samples_per_prompt
        n = train.size
        bar, parts = self._bar(f"step {self.step + 1} update", -(-n // per_mb)), []
        for sl in (slice(i, i + per_mb) for i in range(0, n, per_mb)):
            parts.append(self.policy.train_step(train.select(sl)))
            bar.update(1)
        bar.close()
        self.policy.end_rollout_step()
        return parts

    def _collect(self):
        """The step's rollouts as this rank's RolloutBatch, and (separate placement) the schedule's
        record of them; the data position moves past the prompts they used."""
        if self.remote is not None:
            batch, schedule = self.remote.collect(self.step + 1, self.cfg.rollout)
            self.data_position = schedule["data_position"]
            return batch, schedule
        bar = self._bar(f"step {self.step + 1} rollout", self.cfg.rollout.prompts_per_step)
        try:
            batch, self.data_position = self.collector.collect(
                self.data_position, self.sampler, self.train_data, self.sampling, self.cfg.rollout,
                self.stats if self.algo.adaptive_temperature else None, bar)
        finally:
            bar.close()
        return batch, None

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
        from .rollout.engine import SamplingConfig

        if self.worker is not None:
            return {}  # an engine rank: the trainer ranks evaluate (through it)
        self._start_engines()
        e = self.cfg.eval
        if self.eval_data is None:
            raise ValueError("evaluation needs data.eval (no held-out split for these training sources)")
        n = e.num_prompts if num_prompts is None else num_prompts  # 0: the whole set
        count = min(n or len(self.eval_data), len(self.eval_data))
        t0 = time.perf_counter()
        sampling = SamplingConfig.for_eval(e, self.cfg.rollout.max_response_tokens, self.stop_ids)
        if self.remote is not None:
            groups = self.remote.evaluate(count, e.n)
        else:
            bar = self._bar("eval", -(-count // (256 * self.collector.layout.num_engines)))
            groups = self.collector.evaluate(self.eval_data, count, sampling, e.n, bar)
            bar.close()
        sources = [self.eval_data[g.position].source for g in groups]
        return {**eval_metrics(groups, e.n, sources), "time_eval": time.perf_counter() - t0}

    def export_hf(self, path: str) -> None:
        """The current weights as an HF folder with the model's config and tokenizer (rank 0 writes)."""
        if self.worker is not None:
            return
        save_hf_folder(self.policy.hf_weights(), self.spec, path, self.model_dir, write=self.rank == 0, overwrite=True)
        dist.barrier()

    def close(self) -> None:
        """Ordered shutdown, so that several trainers can run one after another in a process (the demo,
        `compare`): reward workers, writers, then the engine (its memory and vLLM's groups; the job's
        process group stays), then Megatron's groups. Separate placement: the trainer stops the engine
        ranks; an engine rank releases its engine."""
        if self.worker is not None:
            self.worker.close()
            return
        if self.remote is not None:
            self.remote.close()
        if self.rewards is not None:
            self.rewards.close()
        self.logger.close()
        if self.engine is not None:
            self.engine.close()
        destroy_model_parallel()

    # ---- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> List[Dict[str, Any]]:
        """Trains to train.steps (or until a stop request: then a checkpoint at the next safe point
        and a normal return; the next launch resumes there with train.resume=auto). On an engine rank
        (separate placement): serves rollouts until the trainer ranks are done."""
        if self.worker is not None:
            self.worker.serve()
            return []
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
