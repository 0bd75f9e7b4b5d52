"""The RL loop, top to bottom (docs/ARCHITECTURE.md "One step of training").

    rollout (per-token temperature from the previous step's statistics) + rewards
    → dynamic sampling (generate more until the batch is full) → old-policy pass (log-probs,
    entropies) → entropy statistics over the data-parallel group → advantages → mini-batch updates
    → weight sync → metrics → evaluation / checkpoint every K steps

SPMD: one process per rank (torchrun/srun, or a single process). Every rank holds a Megatron shard
and a share of a colocated vLLM engine: one engine per inference-TP group (vLLM's `external_launcher`
on every rank, `rollout/engine.py`). Each step takes `prompts_per_step` prompts at the run's global data
position; every engine generates an equal slice and scores it; a few numbers per response are
gathered so every rank sees the same list (dynamic sampling, metrics and the split over
data-parallel ranks are identical under every layout), and one all-to-all then moves each kept
group's tokens from the rank that generated it to the data-parallel rank that trains on it. A
prompt's samples depend only on (seed, its position).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from . import algorithms as A
from . import device as dev
from .config import Config


def _pad_batch(rows: List[List[int]], prompt_lens: List[int], resp_lens: List[int], device=None):
    """(input_ids, loss_mask) with one spare column so the last position scores nothing; built on
    the host, moved to `device` in one copy each."""
    width = max(len(r) for r in rows) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, p, n) in enumerate(zip(rows, prompt_lens, resp_lens)):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, p - 1: p - 1 + n] = True  # position t scores token t+1
    return ids.to(device or "cpu"), mask.to(device or "cpu")


def _per_position(values, prompt_lens, shape, device=None) -> torch.Tensor:
    out = torch.zeros(shape)
    for i, (v, p) in enumerate(zip(values, prompt_lens)):
        if len(v):
            out[i, p - 1: p - 1 + len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out.to(device or "cpu")


class Sample:
    """One response, compact for gathering across ranks (float32 arrays, not Python lists)."""

    __slots__ = ("token_ids", "temperatures", "entropies", "logprobs", "logprobs_t1", "truncated", "error")

    def __init__(self, response):
        import numpy as np

        self.token_ids = list(response.token_ids)
        for name in ("temperatures", "entropies", "logprobs", "logprobs_t1"):
            setattr(self, name, np.asarray(getattr(response, name), dtype=np.float32))
        self.truncated = response.finish_reason == "length"
        self.error = response.error

    @property
    def length(self) -> int:
        return len(self.token_ids)


class Group:
    """A prompt and its samples, scored; it stays on the rank that generated it until a
    data-parallel rank that trains on it fetches it."""

    __slots__ = ("position", "prompt_ids", "samples", "rewards", "correct", "statuses", "first_error")

    def __init__(self, position, prompt_ids, samples, rewards, correct, statuses, first_error=None):
        self.position, self.prompt_ids, self.samples = position, prompt_ids, samples
        self.rewards, self.correct, self.statuses = rewards, correct, statuses
        self.first_error = first_error  # the first verifier error's reason in this group, if any

    def summary(self) -> "GroupSummary":
        import numpy as np

        temps = np.concatenate([s.temperatures for s in self.samples] or [np.zeros(0, np.float32)])
        return GroupSummary(self.position, list(self.rewards), list(self.correct), list(self.statuses),
                            [s.length for s in self.samples], sum(s.truncated for s in self.samples),
                            (float(temps.min()), float(temps.max()), float(temps.sum()), int(temps.size)) if temps.size else None,
                            self.first_error)


class GroupSummary:
    """What every rank learns about every group (a few numbers per response): enough for dynamic
    sampling, metrics and evaluation; the tokens stay with the owner rank."""

    __slots__ = ("position", "rewards", "correct", "statuses", "lengths", "truncated", "temps", "first_error")

    def __init__(self, position, rewards, correct, statuses, lengths, truncated, temps, first_error=None):
        self.position, self.rewards, self.correct = position, rewards, correct
        self.statuses, self.lengths, self.truncated, self.temps = statuses, lengths, truncated, temps
        self.first_error = first_error


def _describe_groups(groups) -> str:
    """What a list of groups looked like: how many were all correct, all wrong, all errored, mixed."""
    kinds = {"all correct": 0, "all wrong": 0, "all reward errors": 0, "all timed out": 0, "mixed": 0}
    for g in groups:
        if all(st == "error" for st in g.statuses):
            kinds["all reward errors"] += 1
        elif all(st == "timeout" for st in g.statuses):
            kinds["all timed out"] += 1
        elif all(g.correct):
            kinds["all correct"] += 1
        elif not any(g.correct):
            kinds["all wrong"] += 1
        else:
            kinds["mixed"] += 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "none"


class _NoBar:
    n = 0

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


class Trainer:
    def __init__(self, cfg: Config):
        import torch.distributed as dist
        import transformers
        from megatron.core import parallel_state as ps

        from .data import DataOptions, PromptSampler, load_prompts
        from .data import addition
        from .data.datasets import as_sources, default_reward_type, held_out_sources
        from .models.hf_config import ModelSpec
        from .rewards import RewardPool, RewardWorkersError, build_verifier
        from .rollout.engine import RolloutEngine, SamplingConfig
        from .training.parallel import control_group, init_model_parallel
        from .training.policy import MegatronPolicy, PolicyConfig

        self.cfg = cfg
        p, t, r, d = cfg.parallel, cfg.train, cfg.rollout, cfg.data
        alloc_note = dev.check_allocator_config(r.enable_sleep_mode)  # before CUDA starts
        init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=t.seed,
                            timeout_s=p.timeout_s, control_timeout_s=p.control_timeout_s)
        self.device = dev.device()
        self.control = control_group()  # gloo, long timeout: waits for the slowest engine happen here
        self.world = dist.get_world_size()
        cfg.validate(self.world)
        self.algo = cfg.algo()
        self.rank = dist.get_rank()
        if alloc_note and self.rank == 0:
            print(alloc_note, flush=True)
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.rank_dp = [None] * self.world
        dist.all_gather_object(self.rank_dp, self.dp_rank, group=self.control)  # who trains on which data-parallel share
        itp = p.inference_tensor_parallel_size
        self.num_engines, self.engine_index, self.engine_leader = self.world // itp, self.rank // itp, self.rank % itp == 0
        os.makedirs(t.run_dir, exist_ok=True)

        # ---- model folder, tokenizer, data ----
        self.model_dir = cfg.model.hf_path or os.path.join(t.run_dir, "initial_model")
        if cfg.model.hf_path is None and self.rank == 0 and not os.path.exists(os.path.join(self.model_dir, "tokenizer.json")):
            addition.build_model_dir(self.model_dir, seed=t.seed)
        dist.barrier()
        if not os.path.exists(os.path.join(self.model_dir, "config.json")):
            raise FileNotFoundError(f"model.hf_path: {self.model_dir!r} holds no config.json")
        self.spec = ModelSpec.from_hf(self.model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        if len(self.tokenizer) > self.spec.vocab_size:
            raise ValueError(f"model.hf_path: the tokenizer has {len(self.tokenizer)} tokens, the model only "
                             f"{self.spec.vocab_size}")
        max_prompt = min(d.max_prompt_tokens, self.spec.max_position_embeddings - r.max_response_tokens)
        if max_prompt < 1:
            raise ValueError(f"rollout.max_response_tokens={r.max_response_tokens} leaves no room for a prompt in the "
                             f"model's {self.spec.max_position_embeddings} positions")
        opts = DataOptions(prompt_key=d.prompt_key, answer_key=d.answer_key, apply_chat_template=d.apply_chat_template,
                           max_prompt_tokens=max_prompt, strict=d.strict, reasoning_gym_size=d.reasoning_gym_size,
                           reasoning_gym_config=dict(d.reasoning_gym_config))
        self.train_data = load_prompts(d.train, self.tokenizer, opts, "train", seed=t.seed)
        eval_sources = d.eval if d.eval is not None else held_out_sources(d.train)
        self.eval_data = load_prompts(eval_sources, self.tokenizer, opts, "eval", seed=t.seed) if eval_sources else None
        if self.eval_data is None and (cfg.eval.interval or cfg.eval.before_train):
            raise ValueError(f"eval.interval={cfg.eval.interval} / eval.before_train={cfg.eval.before_train}: no eval set; "
                             f"set data.eval (the training sources {as_sources(d.train)} have no held-out split)")
        self.sampler = PromptSampler(len(self.train_data), seed=t.seed, shuffle=d.shuffle)
        self.data_position = 0
        self.stop_ids = self._stop_token_ids()

        # ---- rewards (scored on each engine's first rank) ----
        kind = cfg.reward.type if cfg.reward.type != "auto" else default_reward_type(d.train)
        self.verifier = build_verifier(kind, cfg.reward.correct, cfg.reward.wrong)
        self.rewards, problem = None, ""
        if self.engine_leader:
            try:  # started now, so a script without a main guard or an unloadable verifier stops the run here
                self.rewards = RewardPool(self.verifier, cfg.reward.workers, cfg.reward.timeout_s)
                self.rewards.start()
            except RewardWorkersError as exc:
                problem = str(exc)
        problems = [None] * self.world
        dist.all_gather_object(problems, problem, group=self.control)  # every rank stops, not only the leaders
        if any(problems):
            raise RewardWorkersError(next(p for p in problems if p))

        # ---- policy and engine ----
        self.policy = MegatronPolicy(self.spec, PolicyConfig(
            tensor_model_parallel_size=p.tensor_model_parallel_size, pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            use_distributed_optimizer=p.use_distributed_optimizer, sequence_parallel=p.sequence_parallel,
            micro_batch_size=t.micro_batch_size, dtype=cfg.model.dtype, layer_spec=cfg.model.layer_spec,
            lr=t.lr, lr_warmup_steps=t.lr_warmup_steps, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
            train_steps=t.steps * (r.prompts_per_step // t.mini_batch_prompts), seed=t.seed), self.algo)
        if cfg.model.load:
            from .training.checkpoint import load_model_checkpoint

            load_model_checkpoint(cfg.model.load, self.policy)
        else:
            from .models.convert import read_hf_tensors

            self.policy.load_hf_state_dict(read_hf_tensors(self.model_dir))
        self.engine = RolloutEngine(self.model_dir, max_model_len=self.spec.max_position_embeddings,
                                    kv_cache_memory_bytes=r.kv_cache_memory_bytes, seed=t.seed, tensor_parallel_size=itp,
                                    dtype=cfg.model.dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                                    enable_sleep_mode=r.enable_sleep_mode)
        self.sampling = SamplingConfig(max_tokens=r.max_response_tokens, base_temperature=r.base_temperature, top_p=r.top_p,
                                       adaptive=self.algo.adaptive_temperature, tau=self.algo.tau,
                                       sign_mode=self.algo.sign_mode, stop_token_ids=self.stop_ids)
        self.stats: Optional[A.EntropyStats] = None
        self.step = 0
        self.writer = None
        self.progress = cfg.log.progress == "on" or (cfg.log.progress == "auto" and sys.stderr.isatty())
        self.progress = self.progress and self.rank == 0
        if cfg.model.load:
            self._sync()
        self._maybe_resume()
        if self.rank == 0:
            with open(os.path.join(t.run_dir, "config.yaml"), "w") as f:
                f.write(cfg.dump())
            for ds in (self.train_data, self.eval_data):
                if ds is not None:
                    print(ds.summary(), flush=True)

    # ---- set-up helpers ---------------------------------------------------------------------------

    def _stop_token_ids(self):
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        gen_path = os.path.join(self.model_dir, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return tuple(sorted(ids))

    def _bar(self, desc: str, total: int):
        if not self.progress:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def _sync(self) -> Dict[str, float]:
        from .rollout.weight_sync import sync_policy_to_engine

        return sync_policy_to_engine(self.policy, self.engine)

    # ---- checkpoints ------------------------------------------------------------------------------

    def _ckpt_root(self):
        return os.path.join(self.cfg.train.run_dir, "checkpoints")

    def _maybe_resume(self):
        from .training.checkpoint import find_latest, load_checkpoint

        resume = self.cfg.train.resume
        path = find_latest(self._ckpt_root()) if resume == "auto" else (None if resume == "none" else resume)
        if path is None:
            return
        state = load_checkpoint(path, self.policy)
        self.step = state["step"]
        self.data_position = int(state.get("data_position", 0))
        self.stats = A.EntropyStats.from_dict(state["entropy_stats"]) if state.get("entropy_stats") else None
        self._sync()
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step} (data position {self.data_position})", flush=True)

    def save(self):
        from .training.checkpoint import save_checkpoint

        save_checkpoint(self._ckpt_root(), self.step, self.policy,
                        {"data_position": self.data_position, "entropy_stats": self.stats.to_dict() if self.stats else None,
                         "config": self.cfg.dump()}, keep_last=self.cfg.train.keep_last)

    # ---- rollout ----------------------------------------------------------------------------------

    def _score(self, groups_prompts, outs, truths):
        """Rewards for this engine's responses (its first rank scores; the others return nothing)."""
        if not self.engine_leader:
            return []
        from .rewards import RewardResult, RewardWorkersError

        flat = [x for responses in outs for x in responses]
        texts = self.tokenizer.batch_decode([x.token_ids for x in flat], skip_special_tokens=True)
        try:
            results = self.rewards.score(texts, [g for g, responses in zip(truths, outs) for _ in responses])
        except RewardWorkersError as exc:  # a re-spawn failed: every response errors, and the check stops the run
            results = [RewardResult(self.verifier.failure_reward, str(exc), status="error")] * len(flat)
        out, k = [], 0
        for (position, prompt), responses in zip(groups_prompts, outs):
            res = results[k: k + len(responses)]
            k += len(responses)
            statuses = ["rollout_error" if x.error else s.status for x, s in zip(responses, res)]
            first_error = next((s.reason for x, s in zip(responses, res) if not x.error and s.status == "error"), None)
            out.append(Group(position, prompt, [Sample(x) for x in responses], [s.score for s in res],
                             [bool(s.correct) for s in res], statuses, first_error))
        return out

    def _generate_groups(self, positions: List[int], indices: List[int], dataset, sampling, n, stats):
        """Every engine generates its slice of the prompts and its first rank scores it. Returns the
        summaries of all engines' groups (the same list on every rank, by position) and this rank's
        own full groups {position: Group}."""
        import torch.distributed as dist

        from .data.datasets import split_evenly

        mine = split_evenly(list(zip(positions, indices)), self.num_engines, self.engine_index)
        prompts = [dataset[i].prompt_ids for _, i in mine]
        seeds = [(self.cfg.train.seed * 1_000_003 + pos) % (2**31 - 1) for pos, _ in mine]
        outs = self.engine.generate(prompts, n, sampling, stats, seeds=seeds)
        local = self._score([(pos, dataset[i].prompt_ids) for pos, i in mine], outs, [dataset[i].ground_truth for _, i in mine])
        gathered = [None] * self.world
        dist.all_gather_object(gathered, [g.summary() for g in local], group=self.control)
        summaries = sorted((g for part in gathered for g in part), key=lambda g: g.position)
        self._check_reward_errors(summaries)
        return summaries, {g.position: g for g in local}

    def _check_reward_errors(self, groups: List["GroupSummary"]) -> None:
        """Stops (on every rank: the summaries are the same everywhere) when the verifier errored on
        at least reward.max_error_fraction of a batch's scored responses (default 1.0: on all of
        them), quoting its first error: training or evaluating on failure rewards is never wanted."""
        statuses = [st for g in groups for st in g.statuses if st != "rollout_error"]
        errors = statuses.count("error")
        limit = self.cfg.reward.max_error_fraction
        if not errors or errors < limit * len(statuses):
            return
        first = next((g.first_error for g in groups if g.first_error), "(no reason recorded)")
        raise RuntimeError(f"reward: the verifier failed on {errors} of {len(statuses)} responses of a batch "
                           f"(reward.max_error_fraction={limit:g}); the first error:\n    {first}\n"
                           f"Check reward.type={self.cfg.reward.type!r} on one response by hand "
                           f"(megatron_hapo.rewards.build_verifier(...).score(text, answer)).")

    def _fetch(self, wanted_by_dp_rank: List[List[int]], local: Dict[int, Group]) -> List[Group]:
        """Moves full groups from the ranks that generated them to the data-parallel ranks that
        train on them (one all-to-all of pickled bytes; nothing else crosses ranks). Returns this
        rank's groups in the order of its list."""
        import pickle

        import torch.distributed as dist

        send = []
        for r in range(self.world):
            want = wanted_by_dp_rank[self.rank_dp[r]]
            send.append(pickle.dumps([local[p] for p in want if p in local], protocol=pickle.HIGHEST_PROTOCOL))
        # host bytes over the control group (gloo): no device copies, and the long control timeout
        sizes = torch.tensor([len(b) for b in send], dtype=torch.long)
        recv_sizes = torch.empty_like(sizes)
        dist.all_to_all_single(recv_sizes, sizes, group=self.control)
        out = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8)
        payload = torch.frombuffer(bytearray(b"".join(send)), dtype=torch.uint8) if sum(map(len, send)) else \
            torch.empty(0, dtype=torch.uint8)
        dist.all_to_all_single(out, payload, output_split_sizes=recv_sizes.tolist(), input_split_sizes=sizes.tolist(),
                               group=self.control)
        received: Dict[int, Group] = {}
        for chunk in out.split(recv_sizes.tolist()):
            for g in pickle.loads(chunk.numpy().tobytes()):
                received[g.position] = g
        mine = wanted_by_dp_rank[self.dp_rank]
        missing = [p for p in mine if p not in received]
        if missing:
            raise RuntimeError(f"rollout exchange: groups at positions {missing[:5]} did not arrive")
        return [received[p] for p in mine]

    def _rollout(self):
        """`prompts_per_step` groups (informative ones only under dynamic sampling), the same on every rank."""
        r = self.cfg.rollout
        need = r.prompts_per_step
        kept: List[GroupSummary] = []
        seen: List[GroupSummary] = []
        local: Dict[int, Group] = {}
        gen_batches = 0
        bar = self._bar(f"step {self.step + 1} rollout", need)
        stats = self.stats if self.algo.adaptive_temperature else None
        while len(kept) < need:
            gen_batches += 1
            if r.max_num_gen_batches and gen_batches > r.max_num_gen_batches:
                bar.close()
                raise RuntimeError(f"dynamic sampling: only {len(kept)} of {need} informative groups after "
                                   f"{r.max_num_gen_batches} generation batches (rollout.max_num_gen_batches); "
                                   f"the {len(seen)} groups seen: {_describe_groups(seen)}")
            positions = list(range(self.data_position, self.data_position + need))
            self.data_position += need
            groups, mine = self._generate_groups(positions, self.sampler.indices(positions[0], need), self.train_data,
                                                 self.sampling, r.samples_per_prompt, stats)
            local.update(mine)
            for g in groups:
                rewards = torch.tensor(g.rewards, dtype=torch.float32)
                if r.overlong_buffer:
                    rewards = rewards + A.overlong_penalty(g.lengths, r.max_response_tokens,
                                                           r.overlong_buffer, r.overlong_penalty_factor)
                g.rewards = rewards
                seen.append(g)
                if len(kept) < need and (not r.dynamic_sampling or bool(A.informative_groups(rewards, [0] * len(rewards)).all())):
                    kept.append(g)
            bar.update(len(kept) - bar.n)
            bar.set_postfix_str(f"generation batch {gen_batches}")
        bar.close()
        return kept, seen, gen_batches, local

    # ---- one step ---------------------------------------------------------------------------------

    def train_step(self) -> Dict[str, Any]:
        import numpy as np
        import torch.distributed as dist

        from .data.datasets import split_evenly
        from .parallel import distributed_entropy_stats
        from .training.policy import PolicyBatch

        cfg, r = self.cfg, self.cfg.rollout
        t0 = time.perf_counter()
        kept, seen, gen_batches, local = self._rollout()
        wanted = [[g.position for g in split_evenly(kept, self.dp, d)] for d in range(self.dp)]
        mine_summaries = split_evenly(kept, self.dp, self.dp_rank)
        mine = self._fetch(wanted, local)
        self._last_kept = mine
        t_rollout = time.perf_counter() - t0
        memory = self._memory("rollout")
        self.engine.sleep()  # with rollout.enable_sleep_mode on GPU; a no-op otherwise

        rows, plens, rlens, gids, rewards, eng_t1, beh = [], [], [], [], [], [], []
        for g_idx, (g, summary) in enumerate(zip(mine, mine_summaries)):
            for s, reward in zip(g.samples, summary.rewards.tolist()):  # shaped rewards
                rows.append(list(g.prompt_ids) + s.token_ids)
                plens.append(len(g.prompt_ids))
                rlens.append(s.length)
                gids.append(g_idx)
                rewards.append(reward)
                eng_t1.append(s.logprobs_t1)
                beh.append(s.logprobs)
        ids, mask = _pad_batch(rows, plens, rlens, self.device)
        t1 = time.perf_counter()
        old_logp, old_ent = self.policy.compute_logprobs(PolicyBatch(ids, mask))
        mismatch = A.logprob_mismatch(_per_position(eng_t1, plens, ids.shape, self.device), old_logp, mask)
        step_stats = distributed_entropy_stats(old_ent, mask, group=self.dp_group, pivot=self.algo.pivot)
        h_hat = A.normalized_entropy(old_ent, step_stats, self.algo.sign_mode) if self.algo.uses_entropy else None
        adv, fallback = A.compute_advantages(self.algo, torch.tensor(rewards, device=self.device),
                                             torch.tensor(rlens, device=self.device), gids)
        behaviour = _per_position(beh, plens, ids.shape, self.device) if self.algo.rollout_correction == "tis" else None
        t_old = time.perf_counter() - t1
        memory.update(self._memory("old_pass"))

        t2 = time.perf_counter()
        per_mb = cfg.train.mini_batch_prompts // self.dp * r.samples_per_prompt
        n_mb = (len(rows) + per_mb - 1) // per_mb
        bar = self._bar(f"step {self.step + 1} update", n_mb)
        train_metrics = []
        for start in range(0, len(rows), per_mb):
            sl = slice(start, start + per_mb)
            train_metrics.append(self.policy.train_step(PolicyBatch(
                ids[sl], mask[sl], advantages=adv[sl], old_logp=old_logp[sl],
                h_hat=None if h_hat is None else h_hat[sl], behaviour_logp=None if behaviour is None else behaviour[sl])))
            bar.update(1)
        bar.close()
        t_train = time.perf_counter() - t2
        memory.update(self._memory("update"))
        self.engine.wake_up_weights()  # staged: weights, the sync, then the KV cache
        sync = self._sync()
        self.engine.wake_up_kv_cache()
        memory.update(self._memory("weight_sync"))
        self.stats = step_stats  # the next step's rollout samples with these
        self.step += 1

        # ---- metrics: rollout ones from the global groups (identical on every rank) ----
        # small host tensors: over gloo on GPU nodes too (mixed backend)
        red = torch.tensor([mismatch["logp_mismatch_mean"], mismatch["ratio_bias"], fallback.float().sum().item(),
                            float(fallback.numel())], dtype=torch.float64)
        dist.all_reduce(red, group=self.dp_group)
        mx = torch.tensor([mismatch["logp_mismatch_max"]], dtype=torch.float64)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.dp_group)
        m: Dict[str, Any] = {k: sum(x[k] for x in train_metrics) / len(train_metrics) for k in train_metrics[0]}
        m.update(self._rollout_metrics(kept, seen, gen_batches))
        m.update(step=self.step, entropy_q=step_stats.q, entropy_sigma=step_stats.sigma, entropy_z_pos=step_stats.z_pos,
                 entropy_z_neg=step_stats.z_neg,
                 adv_fallback_frac=(red[2] / red[3].clamp(min=1)).item(),
                 logp_mismatch_mean=red[0].item() / self.dp, ratio_bias=red[1].item() / self.dp, logp_mismatch_max=mx.item(),
                 data_position=self.data_position, data_epoch=self.data_position / len(self.train_data),
                 data_skipped_rows=self.train_data.skipped, time_rollout=t_rollout, time_old_pass=t_old, time_train=t_train,
                 time_weight_sync=sync["weight_sync_s"], weight_sync_bytes=sync["weight_sync_bytes"],
                 time_step=time.perf_counter() - t0)
        m.update(memory)
        m["rollout_tokens_per_s"] = m["response_tokens"] / max(t_rollout, 1e-9)
        self._last_hist = {"h_hat": h_hat[mask].cpu() if h_hat is not None else None, "entropy": old_ent[mask].cpu(),
                           "temperature": torch.from_numpy(np.concatenate([s.temperatures for g in mine for s in g.samples]))}
        return m

    def _memory(self, phase: str) -> Dict[str, float]:
        """Device memory after a phase (GiB reserved by torch, free on the device); empty on CPU."""
        return {f"mem_{phase}_{k}": v for k, v in dev.memory_report().items()}

    def _rollout_metrics(self, kept: List[GroupSummary], seen: List[GroupSummary], gen_batches: int) -> Dict[str, float]:
        def flat(groups, attr):
            return [v for g in groups for v in getattr(g, attr)]

        kept_rewards = torch.cat([g.rewards for g in kept])
        lengths = flat(kept, "lengths")
        temps = [g.temps for g in kept if g.temps is not None] or [(1.0, 1.0, 1.0, 1)]
        statuses = flat(seen, "statuses")
        all_correct, kept_correct = flat(seen, "correct"), flat(kept, "correct")
        return {
            "reward": kept_rewards.mean().item(), "reward_std": kept_rewards.std().item() if kept_rewards.numel() > 1 else 0.0,
            "accuracy": sum(kept_correct) / max(len(kept_correct), 1),
            "rollout_accuracy": sum(all_correct) / max(len(all_correct), 1),
            "response_length": sum(lengths) / max(len(lengths), 1), "response_length_max": float(max(lengths)),
            "response_tokens": float(sum(lengths)),
            "truncated_frac": sum(g.truncated for g in kept) / max(len(lengths), 1),
            "reward_timeouts": float(statuses.count("timeout")), "reward_errors": float(statuses.count("error")),
            "rollout_errors": float(statuses.count("rollout_error")),
            "keep_rate": len(kept) / max(len(seen), 1), "gen_batches": float(gen_batches),
            "temperature_min": min(t[0] for t in temps), "temperature_max": max(t[1] for t in temps),
            "temperature_mean": sum(t[2] for t in temps) / max(sum(t[3] for t in temps), 1),
        }

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(self, num_prompts: Optional[int] = None) -> Dict[str, float]:
        """mean@n and pass@n on the eval set with adaptation off (greedy at temperature 0)."""
        from .rollout.engine import SamplingConfig

        e = self.cfg.eval
        if self.eval_data is None:
            raise ValueError("evaluation needs data.eval (no held-out split for these training sources)")
        # every prompt is evaluated: engines take slices that differ by at most one prompt
        count = min(num_prompts or e.num_prompts or len(self.eval_data), len(self.eval_data))
        t0 = time.perf_counter()
        max_tokens = e.max_response_tokens or self.cfg.rollout.max_response_tokens
        sampling = SamplingConfig(max_tokens=max_tokens, base_temperature=e.temperature or 1.0, top_p=e.top_p,
                                  top_k=1 if e.temperature == 0 else 0, adaptive=False, stop_token_ids=self.stop_ids)
        chunk = 256 * self.num_engines
        groups: List[GroupSummary] = []
        bar = self._bar("eval", (count + chunk - 1) // chunk)
        for start in range(0, count, chunk):
            positions = list(range(start, min(start + chunk, count)))
            groups += self._generate_groups(positions, positions, self.eval_data, sampling, e.n, None)[0]
            bar.update(1)
        bar.close()
        correct = [sum(g.correct) for g in groups]
        lengths = [n for g in groups for n in g.lengths]
        k = e.n
        return {f"eval_mean@{k}": sum(correct) / (len(groups) * k), f"eval_pass@{k}": sum(c > 0 for c in correct) / len(groups),
                "eval_response_length": sum(lengths) / max(len(lengths), 1), "eval_prompts": float(len(groups)),
                "eval_reward_timeouts": float(sum(g.statuses.count("timeout") for g in groups)),
                "eval_reward_errors": float(sum(g.statuses.count("error") for g in groups)),
                "time_eval": time.perf_counter() - t0}

    # ---- warm-up, export, logging ---------------------------------------------------------------------

    def supervised_warmup(self, steps: int, batch_size: int = 64, seed: int = 777) -> List[float]:
        """Teacher-forced warm-up on the gold answers through the same Megatron update: with a fresh
        old-policy pass each step the ratio is 1 and the loss with A = 1 has the gradient of the
        token-mean negative log-likelihood."""
        from .data import PromptSampler
        from .training.policy import PolicyBatch

        sampler = PromptSampler(len(self.train_data), seed=seed)
        eos = self.stop_ids[0]
        losses = []
        for k in range(steps):
            items = [self.train_data[i] for i in sampler.indices(k * batch_size, batch_size)]
            answers = [self.tokenizer(str(x.ground_truth), add_special_tokens=False)["input_ids"] + [eos] for x in items]
            ids, mask = _pad_batch([x.prompt_ids + a for x, a in zip(items, answers)], [len(x.prompt_ids) for x in items],
                                   [len(a) for a in answers], self.device)
            old, _ = self.policy.compute_logprobs(PolicyBatch(ids, mask))
            self.policy.train_step(PolicyBatch(ids, mask, advantages=torch.ones(len(items), device=self.device), old_logp=old,
                                               h_hat=torch.zeros(ids.shape, device=self.device) if self.algo.uses_entropy else None))
            losses.append(-old[mask].mean().item())
        self._sync()
        return losses

    def export_hf(self, path: str) -> None:
        """The current weights as an HF folder with the model's config and tokenizer (rank 0 writes)."""
        import torch.distributed as dist
        from safetensors.torch import save_file

        from .models.convert import copy_hf_assets

        weights = {}
        for name, t in self.policy.hf_weights():  # every rank walks (collectives); rank 0 keeps host copies
            if self.rank == 0:
                weights[name] = t.cpu().clone()
        if self.rank == 0:
            copy_hf_assets(self.model_dir, path)
            save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"))
        dist.barrier()

    def close(self) -> None:
        from .training.parallel import destroy_model_parallel

        if self.rewards is not None:
            self.rewards.close()
        if self.writer is not None:
            self.writer.close()
        del self.engine
        destroy_model_parallel()

    def _log(self, m: Dict[str, Any]) -> None:
        """metrics.jsonl, TensorBoard, token samples for plots (rank 0)."""
        if self.rank != 0:
            return
        t = self.cfg.train
        with open(os.path.join(t.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.cfg.log.tensorboard:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(t.run_dir, "tensorboard"))
            for key, value in m.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(_tb_tag(key), value, m["step"])
            hist = getattr(self, "_last_hist", None) or {}
            for key, values in hist.items():
                if values is not None and values.numel():
                    self.writer.add_histogram(f"distributions/{key}", values.float(), m["step"])
            self.writer.flush()

    def _log_token_samples(self, kept: List[Group]) -> None:
        import numpy as np

        n = self.cfg.log.token_samples
        if self.rank != 0 or n <= 0:
            return
        ent = np.concatenate([s.entropies for g in kept for s in g.samples] or [np.zeros(0, np.float32)])
        temp = np.concatenate([s.temperatures for g in kept for s in g.samples] or [np.zeros(0, np.float32)])
        if ent.size > n:
            pick = np.sort(np.random.default_rng(self.step).choice(ent.size, n, replace=False))
            ent, temp = ent[pick], temp[pick]
        with open(os.path.join(self.cfg.train.run_dir, "token_samples.jsonl"), "a") as f:
            f.write(json.dumps({"step": self.step, "entropy": np.round(ent, 5).tolist(),
                                "temperature": np.round(temp, 5).tolist()}) + "\n")

    # ---- graceful stop ------------------------------------------------------------------------------

    STOP_SIGNALS = ("SIGUSR1", "SIGTERM")

    def _install_stop_handlers(self) -> None:
        """SIGUSR1/SIGTERM ask for a stop at the next safe point (what Slurm's --signal sends before
        the time limit); so does a file `run_dir/STOP` or $MEGATRON_HAPO_STOP_FILE (what
        examples/*/launch.slurm touches, since torchrun does not forward SIGUSR1 to its workers)."""
        import signal
        import threading

        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._stop_signal = signal.Signals(signum).name

        for name in self.STOP_SIGNALS:
            signal.signal(getattr(signal, name), handler)

    def _stop_files(self) -> List[str]:
        files = [os.path.join(self.cfg.train.run_dir, "STOP")]
        if os.environ.get("MEGATRON_HAPO_STOP_FILE"):
            files.append(os.environ["MEGATRON_HAPO_STOP_FILE"])
        return files

    def _stop_requested(self) -> Optional[str]:
        """The reason to stop if any rank was asked to (one tiny gloo all-reduce per step)."""
        import torch.distributed as dist

        reason = getattr(self, "_stop_signal", None) or next((f for f in self._stop_files() if os.path.exists(f)), None)
        flag = torch.tensor([1.0 if reason else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return (reason or "another rank") if flag.item() else None

    def fit(self) -> List[Dict[str, Any]]:
        """Trains to train.steps (or until a stop request: then a checkpoint at the next safe point
        and a normal return; the next launch resumes there with train.resume=auto)."""
        t, e = self.cfg.train, self.cfg.eval
        history = []
        self._install_stop_handlers()
        if e.before_train and self.step == 0 and self.eval_data is not None:
            m0 = {"step": 0, **self.evaluate()}
            self._log(m0)
            self._print_eval(m0)
        while self.step < t.steps:
            m = self.train_step()
            last = self.step == t.steps
            if self.eval_data is not None and ((e.interval and self.step % e.interval == 0) or (last and e.at_end)):
                m.update(self.evaluate())
            history.append(m)
            self._log(m)
            self._log_token_samples(self._last_kept)
            if self.rank == 0:
                self._print_step(m)
            saved = (t.save_interval and self.step % t.save_interval == 0) or last
            if saved:
                self.save()
            reason = self._stop_requested() if not last else None
            if reason:
                if not saved:
                    self.save()
                if self.rank == 0:
                    for f in self._stop_files():
                        if os.path.exists(f):
                            os.remove(f)  # consumed: the resumed run must not stop at once
                    print(f"stop requested ({reason}): saved a checkpoint at step {self.step}; resume with "
                          f"train.resume=auto", flush=True)
                break
        return history

    def _print_step(self, m) -> None:
        line = (f"step {m['step']:>4} reward {m['reward']:+.3f} acc {m['rollout_accuracy']:.3f} (kept {m['accuracy']:.3f}) "
                f"len {m['response_length']:.1f} entropy {m['entropy']:.3f} T [{m['temperature_min']:.3f}, "
                f"{m['temperature_max']:.3f}] clip {m['clip_frac_low']:.3f}/{m['clip_frac_high']:.3f} "
                f"mismatch {m['logp_mismatch_mean']:.1e} keep {m['keep_rate']:.2f} {m['time_step']:.1f}s")
        if m["reward_timeouts"] or m["reward_errors"]:
            line += f" reward timeouts {m['reward_timeouts']:.0f} errors {m['reward_errors']:.0f}"
        evals = {k: v for k, v in m.items() if k.startswith("eval_mean@") or k.startswith("eval_pass@")}
        if evals:
            line += " | " + " ".join(f"{k} {v:.3f}" for k, v in evals.items())
            if m.get("eval_reward_timeouts") or m.get("eval_reward_errors"):
                line += f" eval reward timeouts {m['eval_reward_timeouts']:.0f} errors {m['eval_reward_errors']:.0f}"
        print(line, flush=True)

    def _print_eval(self, m) -> None:
        quiet = ("eval_reward_timeouts", "eval_reward_errors")  # shown when non-zero
        print("eval: " + " ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("eval_") and (k not in quiet or v)),
              flush=True)


def _tb_tag(key: str) -> str:
    for prefix, group in (("eval_", "eval"), ("time_", "time"), ("data_", "data"), ("temperature_", "temperature"),
                          ("entropy", "entropy"), ("logp_mismatch", "mismatch"), ("ratio_bias", "mismatch"),
                          ("mem_", "memory")):
        if key.startswith(prefix):
            return f"{group}/{key}"
    if key in ("reward", "reward_std", "accuracy", "rollout_accuracy", "response_length", "response_length_max",
               "response_tokens", "truncated_frac", "reward_timeouts", "reward_errors", "rollout_errors", "keep_rate",
               "gen_batches", "rollout_tokens_per_s"):
        return f"rollout/{key}"
    return f"train/{key}"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="megatron-hapo train", description="The RL loop: HAPO, DAPO or GRPO.")
    p.add_argument("--config", default=None, help="YAML config (optional)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. algorithm.name=dapo train.steps=100")
    a = p.parse_args(argv)
    cfg = Config.load(a.config, a.overrides)
    trainer = Trainer(cfg)
    if trainer.rank == 0:
        print("effective config:\n" + cfg.dump(), flush=True)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0
