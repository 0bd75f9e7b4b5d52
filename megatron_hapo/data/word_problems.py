"""One-step arithmetic word problems built in code (someone has some things, gets or gives some),
answered on a final "Answer: N" line and checked by the math verifier: the task of the real-model
recipe (examples/smollm2-135m), which a 135 M-parameter chat model partly solves from its
pretraining (it mostly computes the number and often forgets the answer line).

Rows are in the JSONL layout ({"prompt", "answer"}); the held-out split is generated from its own
seed and the training split never holds one of its questions (`splits`). About 18 k distinct
questions exist (12 names × 12 things × 64 pairs × 2 operations), so the splits need no
repeats.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, Iterable, List, Tuple

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Emma", "Noah", "Zoe", "Omar", "Ava")
ITEMS = ("apples", "marbles", "books", "pencils", "cookies", "stickers", "cards", "shells", "coins", "stamps",
         "balloons", "toy cars")
# the two phrasings this model reads best (measured: greedy 0.25-0.36 with them; 0.00-0.04 with
# "A friend gave", "lost N of them" or a box to take from)
GAIN = ("{n} has {a} {it} and gets {b} more. How many {it} does {n} have now?",)
LOSS = ("{n} has {a} {it} and gives away {b}. How many {it} does {n} have left?",)
INSTRUCTION = "\nEnd your reply with a line of the form 'Answer: <number>'."


def problem(rng: random.Random) -> Tuple[str, int]:
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        return rng.choice(GAIN).format(n=n, it=it, a=a, b=b), a + b
    return rng.choice(LOSS).format(n=n, it=it, a=a + b, b=b), a


def rows(count: int, seed: int, exclude: Iterable[str] = ()) -> List[Dict[str, str]]:
    """`count` distinct problems from `seed`, none of whose questions is in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(count * 50):
        q, a = problem(rng)
        if q not in seen:
            seen.add(q)
            out.append({"prompt": q + INSTRUCTION, "answer": str(a)})
            if len(out) == count:
                return out
    raise ValueError(f"word_problems: only {len(out)} distinct problems for {count} asked")


def splits(train_size: int, eval_size: int, seed: int = 0) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """(train, held-out): the held-out questions first, from their own seed; training excludes them."""
    held_out = rows(eval_size, seed=10_000 + seed)
    return rows(train_size, seed=seed, exclude=(r["prompt"][: -len(INSTRUCTION)] for r in held_out)), held_out


def write_splits(folder: str, train_size: int, eval_size: int, seed: int = 0) -> Tuple[str, str]:
    """train.jsonl and eval.jsonl in `folder` (written whole: a temporary file renamed); their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, part in zip(("train", "eval"), splits(train_size, eval_size, seed)):
        path = os.path.join(folder, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths[0], paths[1]
