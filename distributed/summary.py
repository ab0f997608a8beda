"""What a config builds, before training it:  python -m distributed.summary --config FILE [key=value ...]

Prints the model's per-block approximations, its parameter counts and training FLOPs per token (from
model/accounting.py), and the same numbers for the dense equivalent (every site dense, full
attention) with the ratios, so the saving an approximation buys is visible before any compute is
spent; then the stage plan and every block's update budget (steps trained, LR integral, and the
ratio to a block of the dense baseline). `--json` prints the plan alone, as JSON (stages, `blocks`,
`dense_lr_integral`). Config mistakes print the config's one-line errors and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from distributed.config import ConfigError, load_config
from distributed.schedule import build_plan, format_budgets, format_plan, plan_record
from model import GPT, GPTConfig
from model.config import ApproxConfig


def build_on_meta(config: GPTConfig) -> GPT:
    # Accounting only needs shapes and requires_grad: the meta device builds even GPT-2-XL instantly
    # and allocates nothing.
    with torch.device("meta"):
        return GPT(config)


def dense_equivalent(config: GPTConfig) -> GPTConfig:
    return config.model_copy(update={"approx": ApproxConfig()})


def summarize(config: GPTConfig) -> str:
    model = build_on_meta(config)
    dense = build_on_meta(dense_equivalent(config))
    params, dense_params = model.param_counts()["total"], dense.param_counts()["total"]
    flops, dense_flops = model.training_flops_per_token(), dense.training_flops_per_token()
    lines = [model.summary(), "",
             "dense equivalent (every site dense, full causal attention):",
             f"params: total={dense_params:,}",
             f"FLOPs/token at T={dense_flops.seq_len}: forward={dense_flops.forward:,} "
             f"training={dense_flops.training:,}",
             f"approximated / dense: params {params / dense_params:.3f}x, "
             f"training FLOPs {flops.training / dense_flops.training:.3f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distributed.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="experiment YAML, e.g. configs/experiments/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. model.n_layer=6 approx.mlp_fc.rank=16")
    parser.add_argument("--json", action="store_true",
                        help="print the stage plan with per-block budgets as JSON, nothing else")
    parser.add_argument("--world-size", type=int, default=1,
                        help="data-parallel ranks the plan's token counts assume (default 1)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    plan = build_plan(config, args.world_size)
    record = plan_record(config, plan)
    if args.json:
        print(json.dumps({"config": args.config, "overrides": args.overrides,
                          "world_size": args.world_size, **record}, indent=1))
        return 0
    print(f"config: {args.config}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    print(summarize(config.model))
    print(f"\nstage plan ({args.world_size} rank{'s' if args.world_size > 1 else ''}):")
    print(format_plan(plan))
    print()
    print(format_budgets(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
