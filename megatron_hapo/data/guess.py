"""The embedded environment task: guess a hidden number with higher/lower replies
(rollout.environment=guess, rollout/env_api.py), where the model must use earlier replies to win.

Row {"hi": 12, "answer": "7"}: the environment's first message is "1-12?"; each model turn is a
guess and its end of sequence; the environment replies "higher" or "lower" (or "invalid" for
anything but a number in the range) and the episode ends when the guess is right (reward 1) or after
MAX_TURNS guesses (reward 0):

    1-12?  6</s> <output>higher</output> 9</s> <output>lower</output> 7</s>
    ^ prompt ^ model  ^ environment (context)  ^ model   ...                 ^ right: reward 1

Halving the range wins every game in MAX_TURNS = 4 guesses (hi ≤ 15); a guess drawn uniformly from
the numbers still possible wins 60-85 % of them. The supervised warm-up (`warmup_target`) shows the
second strategy: every guess is consistent with the replies so far, none aims at the middle, so RL
has to find that the middle pays. The tokenizer is sentencepiece with digits one piece each and
the replies and tags whole; the model is Qwen2-shaped, built in code. Every
(range, number) pair is a row of both splits: the prompt shows only the range, so nothing of the
hidden number can be learnt from it.
"""
from __future__ import annotations

import random
import re
from typing import Dict, List, Tuple

from ..rollout.env_api import Environment
from .addition import EOS, save_model_dir, task_tokenizer

VOCAB = 48
LOW, HIGHS, MAX_TURNS = 1, range(8, 16), 4
TAGS = ("<output>", "</output>")  # rollout.tool_tags' result pair: the environment's replies
REPLIES = ("higher", "lower", "invalid")
_NUMBER = re.compile(r"\d+")


def pairs() -> List[Tuple[int, int]]:
    return [(hi, x) for hi in HIGHS for x in range(LOW, hi + 1)]


def rows(split: str = "train", seed: int = 0) -> List[Dict[str, str]]:
    """Every (range, hidden number) once, shuffled: {"hi", "answer"} (the answer is the hidden number)."""
    if split not in ("train", "eval"):
        raise ValueError(f"guess: unknown split {split!r} (train | eval)")
    items = pairs()
    random.Random(seed + (split == "eval")).shuffle(items)
    return [{"prompt": f"{LOW}-{hi}?", "hi": hi, "answer": str(x)} for hi, x in items]


class Guess(Environment):
    """The game for one trajectory: reset(row) hides row["answer"] in LOW..row["hi"]."""

    def __init__(self, max_guesses: int = MAX_TURNS):
        self.max_guesses = max_guesses
        self.hi = self.secret = self.guesses = 0

    def reset(self, row) -> str:
        self.hi, self.secret, self.guesses = int(row["hi"]), int(row["answer"]), 0
        if not LOW <= self.secret <= self.hi:
            raise ValueError(f"hidden number {self.secret} outside {LOW}-{self.hi}")
        return f"{LOW}-{self.hi}?"

    def step(self, model_turn: str) -> Tuple[str, bool, float]:
        self.guesses += 1
        m = _NUMBER.match(model_turn.strip())
        guess = int(m.group()) if m else None
        if guess == self.secret:
            return "", True, 1.0
        reply = "invalid" if guess is None or not LOW <= guess <= self.hi else "higher" if guess < self.secret else "lower"
        return reply, self.guesses >= self.max_guesses, 0.0


def play(hi: int, secret: int, rng: random.Random) -> List[Tuple[int, str]]:
    """A consistent random player's game: (guess, reply) per turn, the reply "" for the right guess."""
    lo, top, out = LOW, hi, []
    for _ in range(MAX_TURNS):
        g = rng.randint(lo, top)
        reply = "" if g == secret else "higher" if g < secret else "lower"
        out.append((g, reply))
        if not reply:
            break
        lo, top = (g + 1, top) if reply == "higher" else (lo, g - 1)
    return out


def warmup_target(prompt: str, answer: str, k: int, tokenizer, fmt) -> Tuple[List[int], List[bool]]:
    """The supervised warm-up's response for example k: a consistent random player's game (`play`),
    the environment's replies rendered by the run's `fmt` and not trained on."""
    hi = int(prompt.split("-")[1].split("?")[0])
    ids, mask = [], []
    for g, reply in play(hi, int(answer), random.Random(k * 7919 + hi)):
        turn = tokenizer(str(g), add_special_tokens=False)["input_ids"] + [EOS]
        ids += turn
        mask += [True] * len(turn)
        if reply:
            r = fmt.reply_ids(reply, 8, tokenizer.decode([EOS]))
            ids += r
            mask += [False] * len(r)
    while mask and not mask[-1]:  # a lost game ends with the last guess (its reply is not appended)
        ids.pop()
        mask.pop()
    return ids, mask


def build_tokenizer(out_dir: str):
    """Sentencepiece BPE on games' text: digits one piece each, the replies and tags whole."""
    rng, lines = random.Random(5), []
    for hi, x in pairs() * 4:
        game = "".join(f"{g}{TAGS[0]}{r}{TAGS[1]}" for g, r in play(hi, x, rng))
        lines += [f"{LOW}-{hi}?{game}", "invalid"]
    # digits one piece each (a guess of 12 is two tokens and the end of sequence); the replies are plain
    # text the environment sends, whole pieces by merges (never added tokens, which tool and environment
    # text may not produce: tools.TextFormat.plain_ids)
    return task_tokenizer(out_dir, lines, "guess", VOCAB, 44, special_pieces=TAGS)


def tiny_model_config():
    """multiply's model (Qwen2-shaped, 4 layers, hidden 128: 0.8 M parameters) with this vocabulary and 64 positions."""
    from . import multiply

    config = multiply.tiny_model_config()
    config.vocab_size, config.max_position_embeddings = VOCAB, 64
    return config


def build_model_dir(out_dir: str, seed: int = 0) -> None:
    save_model_dir(out_dir, tiny_model_config(), build_tokenizer, seed)
