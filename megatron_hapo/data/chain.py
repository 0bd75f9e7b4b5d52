"""The second embedded task: a chain of additions and subtractions worked out step by step, with
its own sentencepiece tokenizer and a Qwen2-shaped model built in code (no downloads).

Prompt "23+7-5+9-4=" → response "23+7=30,30-5=25,25+9=34,34-4=30" then </s> (32 tokens with the EOS):
most tokens are forced (copying an operand or the previous result, the operators), a few are real
forks (the digits of each result), and the first mistake decides the outcome. The reward is an
exact match of the whole worked solution. This is the kind of sequence HAPO's per-token entropy
is meant for, where the 3-token answers of `addition` leave it little to act on. Problems are
split by a fixed hash: about a tenth are held out for evaluation and never trained on.
"""
from __future__ import annotations

import random
from typing import Dict, List, Tuple

from .addition import qwen2_config, save_model_dir, task_tokenizer

VOCAB = 32  # the tokenizer's pieces (digits, + - = , and a few merges), rounded up
OPERANDS = 5  # a 2-digit start (10..29), then four 1-digit steps; every partial result in 0..99
TRAIN_SIZE, EVAL_SIZE = 40_000, 512


def _held_out(nums: Tuple[int, ...], ops: str) -> bool:
    return (sum(n * (7 + 6 * i) for i, n in enumerate(nums)) + 13 * ops.count("+")) % 10 == 0


def _problems(split: str, count: int) -> List[Tuple[Tuple[int, ...], str]]:
    """`count` distinct problems of the split: a start in 10..29, steps of ±1..9, partials in 0..99."""
    if split not in ("train", "eval"):
        raise ValueError(f"chain: unknown split {split!r} (train | eval)")
    rng = random.Random(12345)  # the same problem set whatever the run's seed; the seed only orders it
    out, seen = [], set()
    while len(out) < count:
        nums = (rng.randint(10, 29),) + tuple(rng.randint(1, 9) for _ in range(OPERANDS - 1))
        ops = "".join(rng.choice("+-") for _ in range(OPERANDS - 1))
        value, ok = nums[0], True
        for op, n in zip(ops, nums[1:]):
            value = value + n if op == "+" else value - n
            ok = ok and 0 <= value <= 99
        if ok and (nums, ops) not in seen and _held_out(nums, ops) == (split == "eval"):
            seen.add((nums, ops))
            out.append((nums, ops))
    return out


def prompt_and_solution(nums, ops) -> Tuple[str, str]:
    prompt = str(nums[0]) + "".join(op + str(n) for op, n in zip(ops, nums[1:])) + "="
    steps, value = [], nums[0]
    for op, n in zip(ops, nums[1:]):
        new = value + n if op == "+" else value - n
        steps.append(f"{value}{op}{n}={new}")
        value = new
    return prompt, ",".join(steps)


def rows(split: str = "train", seed: int = 0) -> List[Dict[str, str]]:
    """Dataset rows in the same layout as a JSONL file: {"prompt": ..., "answer": ...}."""
    items = _problems(split, TRAIN_SIZE if split == "train" else EVAL_SIZE)
    random.Random(seed).shuffle(items)
    return [dict(zip(("prompt", "answer"), prompt_and_solution(nums, ops))) for nums, ops in items]


def build_tokenizer(out_dir: str):
    """A sentencepiece BPE model trained on the task's text (digits one piece each)."""
    return task_tokenizer(out_dir, [r["prompt"] + r["answer"] for r in rows("train")[:5000]], "chain", VOCAB)


def tiny_model_config():
    """A Qwen2-shaped model: 4 layers, hidden 128, 4 heads of 32: 0.8 M parameters."""
    return qwen2_config(hidden=128, intermediate=384, layers=4, max_positions=96, vocab=VOCAB)


def build_model_dir(out_dir: str, seed: int = 0) -> None:
    """A randomly initialised model and its tokenizer, as an HF folder."""
    save_model_dir(out_dir, tiny_model_config(), build_tokenizer, seed)
