"""Peak extra memory of vocab_parallel_logprobs_and_entropy does not grow with sequence length
when chunked (measured as resident memory in a fresh process; see megatron_hapo.memory)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB, CHUNK = 16384, 256


def extra_bytes(tokens, chunk, entropy_grad=False):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "tests.mem_probe", str(tokens), str(VOCAB), str(chunk), str(int(entropy_grad))],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_memory_is_one_chunk_copy_whatever_the_length(entropy_grad):
    mb = 2**20
    chunk_fp32 = CHUNK * VOCAB * 4
    short, long = extra_bytes(512, CHUNK, entropy_grad), extra_bytes(4096, CHUNK, entropy_grad)
    for phase in ("forward", "backward"):
        # 8x the tokens: each pass needs at most one fp32 copy of a chunk's logits (plus per-token vectors)
        assert long[phase] <= chunk_fp32 + 6 * mb, (phase, long[phase] / mb, chunk_fp32 / mb)
        assert abs(long[phase] - short[phase]) <= 4 * mb, (phase, short[phase] / mb, long[phase] / mb)


def test_unchunked_memory_grows_with_length():
    """The measurement can see growth: unchunked, the forward holds one fp32 copy of all the logits."""
    full_long = 4096 * VOCAB * 4
    unchunked = extra_bytes(4096, None)["forward"]
    assert unchunked >= 0.9 * full_long, (unchunked / 2**20, full_long / 2**20)
