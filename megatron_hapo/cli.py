"""`megatron-hapo` command line."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    if args.toy:
        from .toy import ToyConfig, run

        print("megatron-hapo demo --toy: the algorithm core on a tiny PyTorch policy (no Megatron, no vLLM).\n")
        for algo in args.algorithms.split(","):
            result = run(ToyConfig(algorithm=algo, steps=40, seed=args.seed))
            if result["end_accuracy"] <= result["start_accuracy"]:
                print(f"{algo}: no improvement from reward; something is wrong", file=sys.stderr)
                return 1
        return 0
    from .demo import run_demo

    print("megatron-hapo demo: supervised warm-up, then HAPO and DAPO from the same warm-up, with Megatron-Core "
          "updates and vLLM rollouts on this CPU (2-digit addition, a 0.5 M-parameter Qwen2-shaped model built in code).\n",
          flush=True)
    run_demo(args.run_dir, warmup_steps=args.warmup_steps, rl_steps=args.steps, algorithms=tuple(args.algorithms.split(",")))
    return 0


def _convert(args) -> int:
    from .models import convert

    fn = convert.main_hf_to_megatron if args.direction == "hf-to-megatron" else convert.main_megatron_to_hf
    return fn(args.rest)


PASSTHROUGH = {"train": "trainer", "plot": "plot", "compare": "compare"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-hapo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded CPU demo")
    demo.add_argument("--algorithms", default="hapo,dapo", help="comma-separated: hapo, dapo, grpo")
    demo.add_argument("--steps", type=int, default=120, help="RL steps per algorithm")
    demo.add_argument("--warmup-steps", type=int, default=300)
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--toy", action="store_true", help="the pre-trainer toy (pure PyTorch, seconds)")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="the RL loop: megatron-hapo train [--config FILE] [key.sub=value ...]")
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=lambda a: __import__("megatron_hapo.trainer", fromlist=["main"]).main(a.rest))
    plot = sub.add_parser("plot", help="PNG charts of one or more runs: megatron-hapo plot RUN_DIR [RUN_DIR ...] [--out DIR]")
    plot.add_argument("rest", nargs=argparse.REMAINDER)
    plot.set_defaults(func=lambda a: __import__("megatron_hapo.plot", fromlist=["main"]).main(a.rest))
    compare = sub.add_parser("compare", help="algorithms x seeds on an embedded task with 95%% intervals (see --help)")
    compare.add_argument("rest", nargs=argparse.REMAINDER)
    compare.set_defaults(func=lambda a: __import__("megatron_hapo.compare", fromlist=["main"]).main(a.rest))
    convert = sub.add_parser("convert", help="checkpoint conversion: hf-to-megatron | megatron-to-hf (see --help of each)")
    convert.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    convert.add_argument("rest", nargs=argparse.REMAINDER)
    convert.set_defaults(func=_convert)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:  # their own parsers read everything after the command, options included
        module = __import__(f"megatron_hapo.{PASSTHROUGH[argv[0]]}", fromlist=["main"])
        return module.main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
