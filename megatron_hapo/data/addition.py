"""The embedded task: 2-digit addition with a character vocabulary (no downloads, no hub).

Prompt "<bos>a+b=" → answer digits then <eos>. Reward 1 for the exact sum, 0 otherwise.
"""
from __future__ import annotations

import random
from typing import List, Tuple

CHARS = "0123456789+= "
PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
VOCAB = 32  # 16 used; rounded up for tidy shapes


def encode(text: str) -> List[int]:
    return [OFFSET + CHARS.index(c) for c in text]


def decode(ids) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        if OFFSET <= i < OFFSET + len(CHARS):
            out.append(CHARS[i - OFFSET])
        else:
            out.append("?")
    return "".join(out)


def sample(rng: random.Random) -> Tuple[List[int], str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return [BOS] + encode(f"{a}+{b}="), str(a + b)


def prompts(seed: int, n: int) -> List[Tuple[List[int], str]]:
    rng = random.Random(seed)
    return [sample(rng) for _ in range(n)]


def reward(response_ids, answer: str) -> float:
    return 1.0 if decode(response_ids) == answer and EOS in list(response_ids) else 0.0


def tiny_model_config():
    """A Qwen2-shaped model: 2 layers, hidden 128, 4 heads of 32 (vLLM's CPU attention needs ≥ 32)."""
    import transformers

    return transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
