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
    from . import quiet

    quiet.install(args.verbose)  # before Megatron and vLLM load
    from .demo import run_demo

    print("megatron-hapo demo: supervised warm-up, then HAPO and DAPO from the same warm-up, with Megatron-Core "
          "updates and vLLM rollouts on this CPU (2-digit addition, a 0.5 M-parameter Qwen2-shaped model built in code).\n",
          flush=True)
    run_demo(args.run_dir, warmup_steps=args.warmup_steps, rl_steps=args.steps, algorithms=tuple(args.algorithms.split(",")))
    return 0


def _convert(args) -> int:
    from .models import convert

    if args.direction == "gguf-to-hf":
        from .models import gguf

        return gguf.main(args.rest)
    fn = convert.main_hf_to_megatron if args.direction == "hf-to-megatron" else convert.main_megatron_to_hf
    return fn(args.rest)


def _config(args) -> int:
    if not args.doc:
        from .config import Config

        print(Config.load(args.config, args.overrides).dump(), end="")
        return 0
    from .config_doc import reference, undocumented

    missing = undocumented()
    if missing:
        print(f"megatron-hapo config --doc: settings without a doc comment: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = reference()
    if args.out == "-":
        print(text, end="")
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


PASSTHROUGH = {"train": "train", "plot": "plot", "compare": "compare"}


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
    demo.add_argument("--verbose", action="store_true", help="also the third-party warnings known to be harmless")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="the RL loop: megatron-hapo train [--config FILE] [key.sub=value ...]")
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=lambda a: __import__("megatron_hapo.train", fromlist=["main"]).main(a.rest))
    plot = sub.add_parser("plot", help="PNG charts of one or more runs: megatron-hapo plot RUN_DIR [RUN_DIR ...] [--out DIR]")
    plot.add_argument("rest", nargs=argparse.REMAINDER)
    plot.set_defaults(func=lambda a: __import__("megatron_hapo.plot", fromlist=["main"]).main(a.rest))
    compare = sub.add_parser("compare", help="algorithms x seeds on an embedded task with 95%% intervals (see --help)")
    compare.add_argument("rest", nargs=argparse.REMAINDER)
    compare.set_defaults(func=lambda a: __import__("megatron_hapo.compare", fromlist=["main"]).main(a.rest))
    convert = sub.add_parser("convert", help="checkpoint conversion: hf-to-megatron | megatron-to-hf | gguf-to-hf (see --help of each)")
    convert.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf", "gguf-to-hf"])
    convert.add_argument("rest", nargs=argparse.REMAINDER)
    convert.set_defaults(func=_convert)
    config = sub.add_parser("config", help="the effective config of a run, or (--doc) the configuration reference")
    config.add_argument("--doc", action="store_true", help="write the reference generated from the typed config")
    config.add_argument("--out", default="docs/CONFIG.md", help="where --doc writes (- for standard output)")
    config.add_argument("--config", default=None, help="YAML config (without --doc: print it with every effective value)")
    config.add_argument("overrides", nargs="*", help="key.sub=value")
    config.set_defaults(func=_config)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:  # their own parsers read everything after the command, options included
        module = __import__(f"megatron_hapo.{PASSTHROUGH[argv[0]]}", fromlist=["main"])
        return module.main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
