"""Run as a script (with MALLOC_MMAP_THRESHOLD_ set): peak extra memory of forward+backward."""
import json
import sys

import torch

from megatron_hapo.memory import PeakRSS
from megatron_hapo.parallel import vocab_parallel_logprobs_and_entropy


def measure(tokens: int, vocab: int, chunk, entropy_grad: bool):
    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab).requires_grad_()
    target = torch.randint(0, vocab, (tokens,))
    temp = torch.rand(tokens) + 0.5
    small = torch.randn(8, vocab).requires_grad_()  # warm up code paths and allocator
    vocab_parallel_logprobs_and_entropy(small, target[:8], temp[:8], chunk_size=chunk)[0].sum().backward()
    with PeakRSS() as m:
        logp, ent = vocab_parallel_logprobs_and_entropy(logits, target, temp, chunk_size=chunk, entropy_grad=entropy_grad)
        (logp.sum() + (ent.sum() if entropy_grad else 0)).backward()
    grad_bytes = logits.grad.numel() * logits.grad.element_size()
    return m.extra - grad_bytes  # what the function needed beyond its unavoidable output gradient


if __name__ == "__main__":
    tokens, vocab, chunk = (int(a) if a != "None" else None for a in sys.argv[1:4])
    print(json.dumps({"extra": measure(tokens, vocab, chunk, sys.argv[4] == "1")}))
