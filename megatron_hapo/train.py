"""`torchrun --nproc-per-node 8 ... -m megatron_hapo.train [--config FILE] [key.sub=value ...]`: the
cluster entry point (the same as `megatron-hapo train`)."""
import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
