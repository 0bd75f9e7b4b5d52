"""The separate-placement part of the GPU self-test (run by tools/gpu_selftest.py under torchrun on 2
GPUs; also on CPU with gloo: `torchrun --nproc-per-node 2 tools/gpu_selftest_bridge.py WORK [MiB]`).

rollout.placement=separate with one trainer rank (GPU 0) and one engine rank (GPU 1): the trainer
streams the policy's weights (the self-test model in WORK/model, through `hf_weights`) over the
bridge (NCCL on GPU, gloo on CPU) and the engine rank checks every tensor against the HF folder,
bit for bit; then MiB of synthetic bf16 weights time the transfer in GB/s, against a copy of the
same bytes from device 0 to device 1 (on GPU). Prints `BRIDGE {"figure": ..., "ok": ...}` on the
trainer rank.
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron_hapo import device as dev  # noqa: E402


def _sync():
    if dev.is_gpu():
        torch.cuda.synchronize()


class Synthetic:
    """What send_weights needs of a policy, holding `mib` MiB of bf16 tensors of 64 MiB each."""

    def __init__(self, mib: int, device):
        g = torch.Generator(device=device).manual_seed(0)
        self.tensors = [(f"w{i}", torch.randn(4096, 8192, generator=g, device=device).to(torch.bfloat16))
                        for i in range(max(1, mib // 64))]

    def check_finite(self):
        pass

    def hf_weights(self, bucket_bytes):
        yield from self.tensors


def main() -> int:
    from megatron_hapo.rollout.bridge import receive_message, send_weights
    from megatron_hapo.training.parallel import init_roles

    work, mib = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 512
    roles = init_roles(1)
    d = dev.device()
    model_dir = os.path.join(work, "model")
    if roles.is_trainer:
        from megatron_hapo.algorithms import AlgorithmConfig
        from megatron_hapo.models.convert import read_hf_tensors
        from megatron_hapo.models.hf_config import ModelSpec
        from megatron_hapo.training.parallel import init_model_parallel
        from megatron_hapo.training.policy import MegatronPolicy, PolicyConfig

        init_model_parallel(1, 1)
        policy = MegatronPolicy(ModelSpec.from_hf(model_dir), PolicyConfig(micro_batch_size=2), AlgorithmConfig.preset("dapo"))
        policy.load_hf_state_dict(read_hf_tensors(model_dir))
        walk = send_weights(policy, roles, {"kind": "version", "version": 1})
        big = Synthetic(mib, d)
        send_weights(big, roles, {"kind": "version", "version": 2})  # warm-up: NCCL's channels, the allocator
        _sync()
        t0 = time.perf_counter()
        sent = send_weights(big, roles, {"kind": "version", "version": 3})
        _sync()
        t_bridge = time.perf_counter() - t0
        from megatron_hapo.rollout.bridge import recv_obj

        verdict = recv_obj(roles.batches, 1)
        copy = ""
        if dev.is_gpu() and torch.cuda.device_count() > 1:
            other = torch.device("cuda", (d.index + 1) % torch.cuda.device_count())
            [t.to(other) for _, t in big.tensors]
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            [t.to(other) for _, t in big.tensors]
            torch.cuda.synchronize()
            t_copy = time.perf_counter() - t1
            copy = f" vs a device-to-device copy {sent['weight_sync_bytes'] / t_copy / 1e9:.1f} GB/s"
        figure = (f"the policy's walk ({walk['weight_sync_bytes'] / 2**20:.1f} MiB) arrived bit-exact: {verdict['exact']} "
                  f"({verdict['tensors']} tensors); {sent['weight_sync_bytes'] / 2**20:.0f} MiB bf16 over the bridge "
                  f"({'NCCL' if dev.is_gpu() else 'gloo'}) {sent['weight_sync_bytes'] / t_bridge / 1e9:.2f} GB/s{copy}")
        print("BRIDGE " + json.dumps({"figure": figure, "ok": bool(verdict["exact"])}), flush=True)
    else:
        from megatron_hapo.models.convert import read_hf_tensors
        from megatron_hapo.rollout.bridge import send_obj

        receive = receive_message(roles, d)
        first = receive()
        hf = read_hf_tensors(model_dir)
        got = dict(first["tensors"])
        exact = set(got) <= set(hf) and all(torch.equal(t.cpu(), hf[n]) for n, t in got.items())
        for _ in range(2):
            receive()
        _sync()
        send_obj(roles.batches, {"exact": exact, "tensors": len(got)}, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
