"""``blockdiff`` command line: train, export, plan, generate, eval, data preview, config show, plot, demo.

Every error blockdiff raises on purpose (bad config, data, checkpoint) is printed as one line naming
file, line and field, with exit status 2: never a traceback from deep inside torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from blockdiff.errors import BlockdiffError

# Each subcommand imports its module when it runs (torch, transformers): `blockdiff --help` and
# `blockdiff config show` stay fast.

USAGE = """usage: blockdiff <command> [args]

commands:
  train -c FILE [--section.field VALUE ...]   fine-tune (works under torchrun and plain python)
  rl -c FILE [--section.field VALUE ...]      GRPO with verifiable rewards (same config, run dir and launch as train)
  export RUN_DIR [--out DIR] [--step N] [--dtype float32]   a transformers-loadable model from a run's checkpoint
  generate --model DIR (--prompt T | --input F.jsonl) [...]   sample with the entropy-bound sampler
  eval gsm8k --model DIR --data F.jsonl [...] GSM8K exact-match accuracy
  eval lm-eval --model DIR --tasks T,... [...]   lm-evaluation-harness tasks (pip install 'blockdiff[lm_eval]')
  data preview -c FILE [--rows N] [--json]    the first rows of data.train_path as the trainer sees them
  config show [-c FILE] [--json]              every config field: type, default (or FILE's value), description
  plan -c FILE [--gpus N] [--gpu-memory GIB] [--json] [--rl]   per-GPU memory of a run, before launch
  plot RUN_DIR [--out DIR]                    loss / grad-norm / lr curves as PNG (RL runs: + reward, accuracy, KL)
  demo [--out DIR] [--steps N] [--rl]         the embedded CPU demo: data, train, plot, export, eval (--rl: GRPO)
  bench [--layers 6] [--shapes 768+256,...]   one-GPU step benchmark, blockdiff vs transformers
"""


def _train(argv):
    from blockdiff.config.schema import load_config
    from blockdiff.train.loop import train

    p = argparse.ArgumentParser(prog="blockdiff train", usage="blockdiff train -c FILE [--section.field VALUE ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="every section and field, with type, default and description:\n"
                                       "  blockdiff config show [-c FILE]")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    train(cfg)


def _rl(argv):
    from blockdiff.config.schema import load_config
    from blockdiff.rl.loop import rl_train

    p = argparse.ArgumentParser(prog="blockdiff rl", usage="blockdiff rl -c FILE [--section.field VALUE ...]",
                                epilog="every section and field: blockdiff config show [-c FILE]")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    args, overrides = p.parse_known_args(argv)
    rl_train(load_config(args.config, overrides))


def _export(argv):
    from blockdiff.checkpoint.export import export_run

    p = argparse.ArgumentParser(prog="blockdiff export")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/export)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--merge", action="store_true", help="fold LoRA adapters into the weights")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="dtype of the written weights (default auto: the source checkpoint's, bf16 for the released model)")
    args = p.parse_args(argv)
    out = export_run(args.run_dir, args.out, step=args.step, merge=args.merge, dtype=args.dtype)
    print(f"exported to {out}")


def _plan(argv):
    from blockdiff.plan.report import cli_plan

    cli_plan(argv)


def _plot(argv):
    from blockdiff.rl.plots import is_rl_run, plot_rl
    from blockdiff.train.metrics import plot_run

    p = argparse.ArgumentParser(prog="blockdiff plot")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for path in (plot_rl if is_rl_run(args.run_dir) else plot_run)(args.run_dir, args.out):
        print(path)


def _generate(argv):
    from blockdiff.infer.evaluate import cli_generate

    cli_generate(argv)


def _eval(argv):
    from blockdiff.infer.evaluate import cli_eval

    cli_eval(argv)


def _bench(argv):
    from blockdiff.train.bench import main as bench_main

    bench_main(argv)


def _data(argv):
    from blockdiff.data.preview import cli_data

    cli_data(argv)


def _config(argv):
    from blockdiff.config.show import cli_config

    cli_config(argv)


def _demo(argv):
    from blockdiff.cli.demo import main as demo_main

    demo_main(argv)


COMMANDS = {"train": _train, "rl": _rl, "export": _export, "plan": _plan, "plot": _plot, "generate": _generate, "eval": _eval,
            "demo": _demo, "bench": _bench, "data": _data, "config": _config}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except BlockdiffError as e:
        print(f"blockdiff {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
