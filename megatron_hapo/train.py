"""`torchrun --nproc-per-node 8 ... -m megatron_hapo.train [--config FILE] [key.sub=value ...]`: the
cluster entry point (the same as `megatron-hapo train`). `run(cfg)` decides each rank's role: under
rollout.placement=separate an engine rank serves rollouts until the trainer ranks stop it
(`rollout/engine_rank.py`); every other rank trains (`Trainer(cfg).fit()`)."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from . import quiet

if TYPE_CHECKING:
    from .config import Config

# Nothing heavy at the top: the reward pool's workers start with `spawn`, which imports the launched
# module again (as __mp_main__) in every worker; torch and the config stack here cost each of them ~3 s.


def launch_world() -> int:
    """The launch's world size (torchrun/srun's WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(cfg: Config, on_trainer=None) -> Optional[List[Dict[str, Any]]]:
    """One rank of the job. The placement is checked against the launch first (seconds, not after the
    engines start). Engine rank: serves until the trainer ranks stop it; returns None. Trainer rank:
    `on_trainer(trainer)` once it is built, then fit and close; returns the metric rows of the steps."""
    cfg.validate_launch(launch_world())
    if cfg.rollout.placement == "separate":
        from .training.parallel import init_roles

        p = cfg.parallel
        roles = init_roles(cfg.rollout.engine_ranks, p.timeout_s, p.control_timeout_s)
        if not roles.is_trainer:
            from .rollout.engine_rank import serve

            serve(cfg, roles)
            return None
    from .trainer import Trainer

    trainer = Trainer(cfg)
    try:
        if on_trainer is not None:
            on_trainer(trainer)
        return trainer.fit()
    finally:
        trainer.close()


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="megatron-hapo train", description="The RL loop: HAPO, DAPO or GRPO.")
    p.add_argument("--config", default=None, help="YAML config (optional)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. algorithm.name=dapo train.steps=100")
    a = p.parse_args(argv)
    from .config import Config, ConfigError
    from .training import checkpoint as ckpt

    try:
        cfg = Config.load(a.config, a.overrides)
        cfg.validate_launch(launch_world())
    except ConfigError as exc:  # a setting, not a bug: one line that names it, in seconds
        print(f"megatron-hapo train: config: {exc}", file=sys.stderr, flush=True)
        return 2
    quiet.install(cfg.log.verbose)  # before Megatron and vLLM load

    def announce(trainer):
        if trainer.rank == 0:
            print("effective config:\n" + cfg.dump(), flush=True)

    try:
        run(cfg, announce)
    except ckpt.CheckpointWriteError as exc:  # the disk, not a bug: the message says what to do, no traceback
        print(f"megatron-hapo train: stopped: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
