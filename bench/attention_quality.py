"""Compressed attention vs full attention on a short tiny run: val loss at equal steps and equal FLOPs,
the slot diagnostics, and the loss jump when the compressed model is realized to full attention.

    python -m bench.attention_quality [--steps 200] [--finish 40] [--out FILE.json]
    # or one variant per process (on a shared machine), then compare:
    python -m bench.attention_quality --variant full --out full.json &
    python -m bench.attention_quality --variant compressed --out compressed.json
    python -m bench.attention_quality --compare full.json compressed.json

One process, plain AdamW over GPT.decay_groups() (the trainer's optimizer groups), the tiny
experiment's model, data, batch and LR schedule with every linear dense, so the only difference
between the variants is the attention core. The numbers go to bench/REPORT.md by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from data import build_token_cache, train_batch, validation_batches
from distributed.config import load_config
from model import GPT
from model.accounting import core_flops_ratio

VARIANTS = {"full": "approx.attention={kind: full}",
            "compressed": None}  # None: the tiny experiment's own compressed attention


def lr_at(step: int, steps: int, peak: float, low: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    ratio = min(1.0, (step - warmup) / max(1, steps - warmup))
    return low + 0.5 * (1 + math.cos(math.pi * ratio)) * (peak - low)


@torch.no_grad()
def evaluate(model: GPT, batches) -> float:
    model.eval()
    total = sum(model(x, y)[1].item() * x.size(0) for x, y in batches)
    model.train()
    return total / sum(x.size(0) for x, _ in batches)


def train(model: GPT, cfg, cache, val, steps: int, start: int = 0, total: int | None = None,
          eval_every: int = 50, flops: int = 0) -> list[dict]:
    t = cfg.train
    total = total or steps
    decay, no_decay = model.decay_groups()
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate,
                            betas=(0.9, 0.95))
    flops_per_step = model.training_flops_per_token().training * t.micro_batch_size * cfg.model.block_size
    curve = []
    for step in range(start, start + steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, t.learning_rate, t.min_lr, t.warmup_steps)
        x, y = train_batch(cache.train, seed=cfg.seed, step=step, rank=0, world_size=1,
                           batch_size=t.micro_batch_size, block_size=cfg.model.block_size)
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == start + steps:
            previous = curve[-1]["flops"] if curve else flops
            done = step + 1 - (curve[-1]["step"] if curve else start)
            curve.append({"step": step + 1, "flops": previous + done * flops_per_step,
                          "val_loss": evaluate(model, val), **model.attention_diagnostics()})
            print(json.dumps(curve[-1]), flush=True)
    return curve


def loss_at_flops(curve: list[dict], flops: float) -> float:
    """Val loss of a curve at a FLOP count, linear in log(FLOPs) between its evaluations."""
    xs = np.log([c["flops"] for c in curve])
    return float(np.interp(math.log(flops), xs, [c["val_loss"] for c in curve]))


def compare(results: dict) -> dict:
    full, comp = results["full"]["curve"], results["compressed"]["curve"]
    out = {"equal_steps": {"step": comp[-1]["step"], "full": full[-1]["val_loss"],
                           "compressed": comp[-1]["val_loss"]},
            "equal_flops": {"flops": comp[-1]["flops"], "compressed": comp[-1]["val_loss"],
                            "full": loss_at_flops(full, comp[-1]["flops"])}}
    if "finish" in results["compressed"] and "finish" in results["full"]:
        out["after_finish"] = {"step": results["full"]["finish"][-1]["step"],
                               "full": results["full"]["finish"][-1]["val_loss"],
                               "compressed+finish": results["compressed"]["finish"][-1]["val_loss"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--finish", type=int, default=40, help="full-attention steps after realize")
    parser.add_argument("--val-tokens", type=int, default=8192)
    parser.add_argument("--variant", choices=list(VARIANTS), nargs="+", default=list(VARIANTS))
    parser.add_argument("--compare", nargs=2, metavar=("FULL.json", "COMPRESSED.json"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--save", default=None, help="state dict of the compressed model before realize")
    args = parser.parse_args(argv)
    if args.compare:
        results = {}
        for path in args.compare:
            with open(path) as f:
                results |= json.load(f)
        print(json.dumps(compare(results), indent=1))
        return 0
    torch.set_num_threads(1)
    dense = ["approx.attn_qkv={kind: dense}", "approx.attn_proj={kind: dense}",
             "approx.mlp_fc={kind: dense}", "approx.mlp_proj={kind: dense}",
             "schedule.layerwise=false", "schedule.freeze_previous=false", "schedule.full_rank_finish=false"]
    results = {}
    for name in args.variant:
        override = VARIANTS[name]
        cfg = load_config("configs/experiments/tiny.yaml", dense + ([override] if override else [])
                          + [f"data.val_tokens={args.val_tokens}"])
        cache = build_token_cache(cfg.data)
        val = validation_batches(cache.val, batch_size=cfg.train.micro_batch_size,
                                 block_size=cfg.model.block_size, num_tokens=cfg.data.val_tokens)
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model)
        started = time.perf_counter()
        total = args.steps + args.finish  # one LR schedule for both variants, finish included
        curve = train(model, cfg, cache, val, args.steps, total=total)
        result = {"attention": cfg.model.approx.attention.describe(),
                  "core_flops_ratio": core_flops_ratio(model)[0], "curve": curve}
        if name == "compressed":
            if args.save:
                torch.save(model.state_dict(), args.save)
            before = curve[-1]["val_loss"]
            model.realize()
            after = evaluate(model, val)
            result["realize"] = {"before": before, "after": after, "jump": after - before}
            print(json.dumps(result["realize"]), flush=True)
        if args.finish:  # the full baseline trains on too: same steps, same schedule
            result["finish"] = train(model, cfg, cache, val, args.finish, start=args.steps,
                                     total=total, eval_every=args.finish, flops=curve[-1]["flops"])
        result["seconds"] = time.perf_counter() - started
        results[name] = result
    if len(results) == 2:
        results["compare"] = compare(results)
        print(json.dumps(results["compare"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
