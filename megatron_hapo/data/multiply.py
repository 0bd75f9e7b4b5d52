"""The embedded tool task: multiply a 3-digit by a 3-4-digit number, which a 1 M-parameter model
cannot do in its head but can hand to the `python` tool and copy back (rollout.tools=[python]).

Prompt "123*4567=" → a response that calls the tool, reads its result and answers:

    <python>print(123*4567)</python>  <output>561741</output>  561741</s>
    ^ model tokens                    ^ tool tokens (context)  ^ model tokens

or one that answers directly ("561741</s>", almost always wrong). The reward is an exact match of
the model's last turn with the product. The supervised warm-up (`warmup_target`) shows the call on
a share of its examples (TOOL_SHARE) and direct answers on the rest, so RL starts from a model that
sometimes calls the tool and has to learn from reward alone that calling it pays. The tokenizer is
sentencepiece on the task's text with the tags and `print(` as whole pieces, and an `<error>` token
for the tool's errors (it cannot spell them); the model is
Qwen2-shaped, built in code. Pairs split by a fixed hash: about a tenth held out, never trained on.
"""
from __future__ import annotations

import random
from typing import Dict, List, Tuple

from .addition import EOS, qwen2_config, save_model_dir, task_tokenizer

VOCAB = 32
TAGS = ("<python>", "</python>", "<output>", "</output>")
TOOL_SHARE = 0.3  # warm-up examples that call the tool
TRAIN_SIZE, EVAL_SIZE = 40_000, 512


def _held_out(a: int, b: int) -> bool:
    return (a * 7 + b * 13) % 10 == 0


def _pairs(split: str, count: int) -> List[Tuple[int, int]]:
    if split not in ("train", "eval"):
        raise ValueError(f"multiply: unknown split {split!r} (train | eval)")
    rng, out, seen = random.Random(4242), [], set()
    while len(out) < count:
        a, b = rng.randint(100, 999), rng.randint(100, 9999)
        if (a, b) not in seen and _held_out(a, b) == (split == "eval"):
            seen.add((a, b))
            out.append((a, b))
    return out


def rows(split: str = "train", seed: int = 0) -> List[Dict[str, str]]:
    """Dataset rows in the same layout as a JSONL file: {"prompt": ..., "answer": ...}."""
    items = _pairs(split, TRAIN_SIZE if split == "train" else EVAL_SIZE)
    random.Random(seed).shuffle(items)
    return [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a, b in items]


def call_text(prompt: str) -> str:
    """The model's call for a prompt "a*b=": <python>print(a*b)</python>."""
    return f"{TAGS[0]}print({prompt.rstrip('=')}){TAGS[1]}"


def warmup_target(prompt: str, answer: str, k: int, tokenizer, fmt) -> Tuple[List[int], List[bool]]:
    """The supervised warm-up's response for example k: (token ids, model mask). TOOL_SHARE of the
    examples call the tool, the tool turn rendered by the run's own `fmt` (not trained on); the rest
    answer directly. Both end with the answer and EOS."""
    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    final = enc(answer) + [EOS]
    if fmt is None or (k * 7919) % 100 >= TOOL_SHARE * 100:
        return final, [True] * len(final)
    call, result = enc(call_text(prompt)), fmt.result_ids(answer, 64)
    return call + result + final, [True] * len(call) + [False] * len(result) + [True] * len(final)


def build_tokenizer(out_dir: str):
    """Sentencepiece BPE on the task's text (digits one piece each; the tags and `print(` whole)."""
    lines = []
    for r in rows("train")[:5000]:
        lines.append(r["prompt"] + call_text(r["prompt"]) + TAGS[2] + r["answer"] + TAGS[3] + r["answer"])
    from ..rollout.tools import ERROR_TOKEN

    # <error>: the tool's errors ("Error: timed out ...") are letters this vocabulary cannot spell
    return task_tokenizer(out_dir, lines, "multiply", VOCAB, 28, special_pieces=TAGS + ("print(",),
                          added_tokens=(ERROR_TOKEN,))


def tiny_model_config():
    """A Qwen2-shaped model: 4 layers, hidden 128, 4 heads of 32: 0.8 M parameters."""
    return qwen2_config(hidden=128, intermediate=384, layers=4, max_positions=128, vocab=VOCAB)


def build_model_dir(out_dir: str, seed: int = 0) -> None:
    save_model_dir(out_dir, tiny_model_config(), build_tokenizer, seed)
