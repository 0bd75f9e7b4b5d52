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
    with PeakRSS() as fwd:
        logp, ent = vocab_parallel_logprobs_and_entropy(logits, target, temp, chunk_size=chunk, entropy_grad=entropy_grad)
        loss = logp.sum() + (ent.sum() if entropy_grad else 0)
    with PeakRSS() as bwd:
        loss.backward()
    grad_bytes = logits.grad.numel() * logits.grad.element_size()
    # what each pass needed beyond its inputs and the unavoidable gradient of the logits
    return {"forward": fwd.extra, "backward": bwd.extra - grad_bytes}


if __name__ == "__main__":
    tokens, vocab, chunk = (int(a) if a != "None" else None for a in sys.argv[1:4])
    print(json.dumps(measure(tokens, vocab, chunk, sys.argv[4] == "1")))
