"""A self-contained RL run of the algorithm core on a tiny PyTorch policy (no Megatron, no vLLM).

Task "digit sum": the prompt is a target s in [1, 18]; the policy writes digits 1–9 and then
EOS; the reward is 1 when the digits sum to s (plus DAPO's overlong penalty). Every HAPO piece
runs for real: adaptive-temperature sampling from the previous step's entropy statistics,
token-level group advantages, dynamic sampling, redistribution, adaptive clipping and the
dual-clip loss. It is the smallest honest slice of the pipeline and exists to exercise
`megatron_hapo.algorithms` end to end on one CPU in seconds.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from . import algorithms as A
from .parallel import vocab_parallel_logprobs_and_entropy

EOS, VOCAB, MAX_LEN, MAX_TARGET = 0, 10, 6, 18


class BagPolicy(torch.nn.Module):
    """logits(t) = W·tanh(E_target[s] + Σ E_tok[prefix] + E_pos[t])."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.target = torch.nn.Embedding(MAX_TARGET + 1, hidden)
        self.tok = torch.nn.Embedding(VOCAB, hidden)
        self.pos = torch.nn.Embedding(MAX_LEN, hidden)
        self.out = torch.nn.Linear(hidden, VOCAB)

    def forward(self, targets: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """targets [N], tokens [N, L] → logits [N, L, V] for positions 0..L-1 (teacher forcing)."""
        n, length = tokens.shape
        prefix = torch.cumsum(self.tok(tokens), dim=1) - self.tok(tokens)  # tokens strictly before t
        h = self.target(targets)[:, None] + prefix + self.pos.weight[None, :length]
        return self.out(torch.tanh(h))


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor):
    return vocab_parallel_logprobs_and_entropy(logits, tokens)


@torch.no_grad()
def rollout(policy, targets, stats, cfg, generator):
    n = targets.numel()
    tokens = torch.zeros(n, MAX_LEN, dtype=torch.long)
    mask = torch.zeros(n, MAX_LEN, dtype=torch.bool)
    temps = torch.ones(n, MAX_LEN)
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(MAX_LEN):
        logits = policy(targets, tokens[:, : t + 1])[:, t]
        _, ent = logprobs_and_entropy(logits, tokens[:, t])
        temp = A.adaptive_temperature(ent, stats if cfg.adaptive_temperature else None, 1.0, cfg.tau, cfg.sign_mode)
        probs = torch.softmax(logits / temp[:, None], dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tokens[:, t] = torch.where(alive, nxt, EOS)
        mask[:, t] = alive
        temps[:, t] = temp
        alive = alive & (nxt != EOS)
    return tokens, mask, temps


def score(targets, tokens, mask):
    digits = torch.where(mask & (tokens != EOS), tokens, 0)
    finished = (mask & (tokens == EOS)).any(-1)
    return ((digits.sum(-1) == targets) & finished).float()


@torch.no_grad()
def greedy_accuracy(policy):
    targets = torch.arange(1, MAX_TARGET + 1)
    tokens = torch.zeros(len(targets), MAX_LEN, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    alive = torch.ones(len(targets), dtype=torch.bool)
    for t in range(MAX_LEN):
        nxt = policy(targets, tokens[:, : t + 1])[:, t].argmax(-1)
        tokens[:, t] = torch.where(alive, nxt, EOS)
        mask[:, t] = alive
        alive = alive & (nxt != EOS)
    return score(targets, tokens, mask).mean().item()


@dataclasses.dataclass
class ToyConfig:
    algorithm: str = "hapo"
    steps: int = 40
    prompts: int = 32
    samples: int = 8
    lr: float = 3e-2
    mini_batches: int = 2
    overlong_buffer: int = 2
    seed: int = 0


def run(cfg: ToyConfig, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    algo = A.AlgorithmConfig.preset(cfg.algorithm)
    policy = BagPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    stats = None
    start_acc = greedy_accuracy(policy)
    log(f"algorithm={algo.name} sign_mode={algo.sign_mode} loss_stats={algo.loss_stats} greedy accuracy at start {start_acc:.2f}")
    log(f"{'step':>4} {'reward':>7} {'kept':>5} {'entropy':>8} {'T min':>6} {'T max':>6} {'clip lo':>7} {'clip hi':>7} {'redist':>7}")
    t0 = time.perf_counter()
    history = []
    for step in range(1, cfg.steps + 1):
        targets = torch.randint(1, MAX_TARGET + 1, (cfg.prompts,), generator=gen).repeat_interleave(cfg.samples)
        groups = torch.arange(cfg.prompts).repeat_interleave(cfg.samples)
        tokens, mask, temps = rollout(policy, targets, stats, algo, gen)
        lengths = mask.sum(-1)
        correct = score(targets, tokens, mask)
        rewards = correct + A.overlong_penalty(lengths, MAX_LEN, cfg.overlong_buffer, 1.0)

        with torch.no_grad():  # old-policy pass at T = 1
            old_logp, old_ent = logprobs_and_entropy(policy(targets, tokens), tokens)
        step_stats = A.entropy_stats(old_ent, mask, algo.pivot)
        adv, _ = A.compute_advantages(algo, rewards, lengths, groups)
        keep = A.informative_groups(rewards, groups)  # dynamic sampling (one batch here)
        h_hat = A.loss_entropy_scale(algo, mask, step_stats=step_stats, old_entropy=old_ent) if algo.uses_entropy else None

        idx = keep.nonzero().squeeze(-1)
        sums: dict[str, float] = {}
        if idx.numel():
            for part in idx[torch.randperm(idx.numel(), generator=gen)].tensor_split(cfg.mini_batches):
                if not part.numel():
                    continue
                logits = policy(targets[part], tokens[part])
                logp, cur_ent = logprobs_and_entropy(logits, tokens[part])
                h = None
                if algo.uses_entropy:
                    h = h_hat[part] if algo.loss_stats == "step_old" else A.loss_entropy_scale(algo, mask[part], current_entropy=cur_ent)
                loss, m = A.compute_policy_loss(algo, logp, old_logp[part], adv[part], mask[part], h_hat=h)
                opt.zero_grad()
                loss.backward()
                opt.step()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
        stats = step_stats  # next step's sampling uses this step's old-policy statistics
        tok = max(sums.get("tokens", 0.0), 1.0)
        row = dict(step=step, reward=rewards.mean().item(), accuracy=correct.mean().item(), kept=keep.float().mean().item(),
                   entropy=old_ent[mask].mean().item(), t_min=temps[mask].min().item(), t_max=temps[mask].max().item(),
                   clip_low=sums.get("clip_low", 0) / tok, clip_high=sums.get("clip_high", 0) / tok,
                   redistributed=sums.get("adv_redistributed", 0) / tok)
        history.append(row)
        if step == 1 or step % 5 == 0 or step == cfg.steps:
            log(f"{step:>4} {row['reward']:>7.3f} {row['kept']:>5.2f} {row['entropy']:>8.3f} {row['t_min']:>6.3f} "
                f"{row['t_max']:>6.3f} {row['clip_low']:>7.3f} {row['clip_high']:>7.3f} {row['redistributed']:>7.3f}")
    end_acc = greedy_accuracy(policy)
    log(f"greedy accuracy {start_acc:.2f} -> {end_acc:.2f}; sampled accuracy {history[0]['accuracy']:.2f} -> "
        f"{history[-1]['accuracy']:.2f} in {cfg.steps} steps, {time.perf_counter() - t0:.1f} s")
    return {"start_accuracy": start_acc, "end_accuracy": end_acc, "history": history, "final_stats": stats}
