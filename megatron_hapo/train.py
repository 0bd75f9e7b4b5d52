"""`torchrun --nproc-per-node 8 ... -m megatron_hapo.train [--config FILE] [key.sub=value ...]`: the
cluster entry point (the same as `megatron-hapo train`)."""
import sys

from . import quiet
from .config import Config
from .training import checkpoint as ckpt


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="megatron-hapo train", description="The RL loop: HAPO, DAPO or GRPO.")
    p.add_argument("--config", default=None, help="YAML config (optional)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. algorithm.name=dapo train.steps=100")
    a = p.parse_args(argv)
    cfg = Config.load(a.config, a.overrides)
    quiet.install(cfg.log.verbose)  # before Megatron and vLLM load
    from .trainer import Trainer

    trainer = Trainer(cfg)
    if trainer.rank == 0:
        print("effective config:\n" + cfg.dump(), flush=True)
    try:
        trainer.fit()
    except ckpt.CheckpointWriteError as exc:  # the disk, not a bug: the message says what to do, no traceback
        print(f"megatron-hapo train: stopped: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
