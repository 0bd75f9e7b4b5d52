"""Sentencepiece tokenizers trained in code on a task's own text, saved as Hugging Face tokenizers
(tokenizer.json + config + chat template): the embedded demo's and the tests' (no hub)."""
from __future__ import annotations

import io
import json
import os
from typing import Iterable

SPECIALS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}


def train_sentencepiece(out_dir: str, lines: Iterable[str], vocab_size: int, chat_template: str, *,
                        split_digits: bool = True, model_type: str = "bpe", special_pieces=(), added_tokens=()):
    """Trains a sentencepiece model on `lines` (<pad>=0, <s>=1, </s>=2, <unk>=3; text kept verbatim:
    no normalisation, whitespace and newlines preserved; `special_pieces` never split; `added_tokens`
    appended after the trained pieces), saves it in out_dir as a fast HF tokenizer with `chat_template`,
    and returns the loaded tokenizer."""
    import sentencepiece as spm
    import transformers

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_writer=buf, model_type=model_type, vocab_size=vocab_size,
        split_digits=split_digits, character_coverage=1.0, add_dummy_prefix=False, hard_vocab_limit=False,
        minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=list(special_pieces), **SPECIALS)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False, "legacy": False,
                   "add_prefix_space": False}, f)
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    tok.chat_template = chat_template
    if added_tokens:  # after the trained pieces: their ids stay what the training gave them
        tok.add_tokens(list(added_tokens))
    tok.save_pretrained(out_dir)
    os.remove(os.path.join(out_dir, "tokenizer.model"))  # tokenizer.json carries it now
    return transformers.AutoTokenizer.from_pretrained(out_dir)
