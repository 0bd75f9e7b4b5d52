"""The embedded task: 2-digit addition, a sentencepiece tokenizer trained on its own text, and a
Qwen2-shaped model built in code (no downloads, no hub).

Prompt "a+b=" (rendered by the tokenizer's chat template, which only adds <s>) → the sum, then
</s>. Pairs split by a fixed hash: about a tenth are held out for evaluation and never trained on.
"""
from __future__ import annotations

import random
from typing import Dict, List

import torch

PAD, BOS, EOS = 0, 1, 2  # the sentencepiece model is trained with these ids
VOCAB = 32  # the model's vocabulary: the tokenizer's 16 pieces, rounded up for tidy shapes
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _held_out(a: int, b: int) -> bool:
    return (a * 31 + b * 17) % 10 == 0


def pairs(split: str):
    if split not in ("train", "eval"):
        raise ValueError(f"addition: unknown split {split!r} (train | eval)")
    return [(a, b) for a in range(10, 100) for b in range(10, 100) if _held_out(a, b) == (split == "eval")]


def rows(split: str = "train", seed: int = 0) -> List[Dict[str, str]]:
    """Dataset rows in the same layout as a JSONL file: {"prompt": ..., "answer": ...}."""
    items = pairs(split)
    random.Random(seed).shuffle(items)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in items]


def build_tokenizer(out_dir: str):
    """A sentencepiece BPE model trained on the task's text (digits split: one piece each), saved as
    a Hugging Face tokenizer with a chat template; returns the loaded tokenizer."""
    return task_tokenizer(out_dir, [f"{a}+{b}={a + b}" for a, b in pairs("train")], "addition")


def task_tokenizer(out_dir: str, lines, task: str, vocab: int = VOCAB, pieces: int = 24, **options):
    """An embedded task's tokenizer: sentencepiece BPE on its text (`pieces` asked for, `options` to
    `train_sentencepiece`), <pad>/<s>/</s> at 0/1/2, at most `vocab` tokens."""
    from .tokenizers import train_sentencepiece

    tok = train_sentencepiece(out_dir, lines, pieces, CHAT_TEMPLATE, **options)
    if len(tok) > vocab or (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != (BOS, EOS, PAD):
        raise RuntimeError(f"{task} tokenizer: unexpected vocabulary ({len(tok)} pieces, special ids "
                           f"{tok.bos_token_id}/{tok.eos_token_id}/{tok.pad_token_id})")
    return tok


def qwen2_config(hidden: int = 128, intermediate: int = 256, layers: int = 2, max_positions: int = 64, vocab: int = VOCAB):
    """A tiny Qwen2-shaped config: heads of 32 (vLLM's CPU attention needs ≥ 32), 2 KV heads, tied embeddings."""
    import transformers

    return transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def tiny_model_config():
    """2 layers, hidden 128, 4 heads of 32: 0.5 M parameters."""
    return qwen2_config()


def save_model_dir(out_dir: str, config, build_tok, seed: int = 0) -> None:
    """A randomly initialised model of `config` and the task's tokenizer (`build_tok(out_dir)`), as an HF folder."""
    import transformers

    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    build_tok(out_dir)


def build_model_dir(out_dir: str, seed: int = 0) -> None:
    """A randomly initialised model and its tokenizer, as an HF folder."""
    save_model_dir(out_dir, tiny_model_config(), build_tokenizer, seed)
