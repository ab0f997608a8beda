"""The rank advisor: how much rank each site of a trained dense model uses, measured two ways.

    python -m tune.rank_advisor RUN_DIR [--share 0.9] [--json]

RUN_DIR is a finished dense run (its config.yaml and final/ export), e.g. an ablation's dense baseline.

1. **The learned update W - W0.** A trained weight is its random initialisation plus what training
   added. The initialisation is full-rank noise (a random 384x128 N(0, 0.02) matrix needs 94 of its
   128 singular values for 90% of its energy), so the spectrum of W mostly measures W0. W0 is
   regenerated from the run's seed exactly as the trainer built it (distributed.train.initial_model),
   and the spectrum of W - W0 says how many directions training used: its energy rank (the
   smallest k whose top-k singular values keep `share` of sum(s^2)) and stable rank
   (sum(s^2) / max(s)^2).
2. **Loss sensitivity, measured directly.** Frobenius energy is not loss. For each site, every
   block's weight is replaced by its best rank-r approximation (truncated SVD; for ABBA's knob r,
   rank r^2, the most its Hadamard product reaches) and the validation loss increase over a few
   batches is measured. A model trained at rank r adapts to it, so this is a pessimistic bound on
   what rank r costs, and a cheap way to place a sweep's grid (`advise_sweep`): from the smallest
   rank whose truncation costs at most `loose` nats to the smallest costing at most `tight`, clipped
   below the FLOPs break-even. The rank search shows these predictions beside what the sweep
   measured (ranks.md).

Compressed attention has no weight to truncate: its grid stays the configured one.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from model.config import SITES

# nanoGPT state-dict name of each approximable linear site.
SITE_KEYS = {"attn_qkv": "attn.c_attn.weight", "attn_proj": "attn.c_proj.weight",
             "mlp_fc": "mlp.c_fc.weight", "mlp_proj": "mlp.c_proj.weight"}
SITE_MODULES = {"attn_qkv": ("attn", "c_attn"), "attn_proj": ("attn", "c_proj"),
                "mlp_fc": ("mlp", "c_fc"), "mlp_proj": ("mlp", "c_proj")}
_BLOCK_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def energy_rank(singular_values: torch.Tensor, share: float) -> int:
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share = {share}: must be in (0, 1]")
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # The small tolerance keeps share=1.0 from demanding rank beyond round-off.
    return int(torch.searchsorted(cumulative, torch.tensor(share - 1e-12, dtype=torch.float64)).item()) + 1


def stable_rank(singular_values: torch.Tensor) -> float:
    s = singular_values.double()
    return float((s ** 2).sum() / s.max() ** 2) if s.numel() and s.max() > 0 else 0.0


def analyse_weight(weight: torch.Tensor, share: float) -> tuple[int, float]:
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    return energy_rank(s, share), stable_rank(s)


@dataclass(frozen=True)
class WeightRank:
    layer: int
    site: str
    shape: tuple[int, int]
    full_rank: int            # min(out, in)
    energy_rank: int          # of the trained W
    update_energy_rank: int | None   # of W - W0 (None without W0)
    update_stable_rank: float | None
    init_energy_rank: int | None     # of W0 alone: what the spectrum of W inherits from noise


def site_weights(state: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, site) -> weight of every approximable linear in a dense nanoGPT-keyed state dict."""
    by_key = {v: k for k, v in SITE_KEYS.items()}
    out = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match and match.group(2) in by_key:
            out[(int(match.group(1)), by_key[match.group(2)])] = tensor.detach().to(torch.float64)
    if not out:
        raise ValueError("no block weights found: expected a dense nanoGPT state dict with keys like "
                         "transformer.h.0.attn.c_attn.weight")
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], list(SITE_KEYS).index(kv[0][1]))))


def update_ranks(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor] | None,
                 share: float = 0.9) -> list[WeightRank]:
    """Energy ranks of W, of W0 and of the learned update W - W0 for every site and layer."""
    final = site_weights(trained)
    init = site_weights(initial) if initial is not None else {}
    out = []
    for (layer, site), w in final.items():
        w0 = init.get((layer, site))
        s_w = torch.linalg.svdvals(w)
        s_u = torch.linalg.svdvals(w - w0) if w0 is not None else None
        out.append(WeightRank(layer, site, tuple(w.shape), min(w.shape), energy_rank(s_w, share),
                              energy_rank(s_u, share) if s_u is not None else None,
                              stable_rank(s_u) if s_u is not None else None,
                              analyse_weight(w0, share)[0] if w0 is not None else None))
    return out


@torch.no_grad()
def mean_loss(model, batches) -> float:
    total = count = 0
    for x, y in batches:
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    return total / count


@torch.no_grad()
def truncation_losses(model, batches, site: str, ranks: list[int]) -> dict[int, float]:
    """Validation-loss increase when every block's `site` weight is cut to rank r (dense model)."""
    model.eval()
    base = mean_loss(model, batches)
    layers = [getattr(getattr(block, SITE_MODULES[site][0]), SITE_MODULES[site][1])
              for block in model.transformer.h]
    saved = [layer.weight.detach().clone() for layer in layers]
    factors = [torch.linalg.svd(w.double(), full_matrices=False) for w in saved]   # once per weight
    out = {}
    try:
        for r in ranks:
            for layer, (u, s, vh) in zip(layers, factors):
                layer.weight.copy_((u[:, :r] * s[:r]) @ vh[:r])   # the best rank-r approximation
            out[r] = mean_loss(model, batches) - base
    finally:
        for layer, w in zip(layers, saved):
            layer.weight.copy_(w)
    return out


def dense_baseline_run(ablation_dir: Path) -> Path:
    """The finished dense baseline's run directory of an ablation."""
    from distributed.config import ConfigError
    from tune.results import EXPERIMENT_JSON, TRIALS, read_json

    spec = read_json(Path(ablation_dir) / EXPERIMENT_JSON)
    for trial in spec["trials"]:
        run_dir = Path(ablation_dir) / TRIALS / trial["trial_name"]
        if trial["baseline"] and (run_dir / "final" / "config.json").is_file():
            return run_dir
    raise ConfigError(f"{ablation_dir}: no finished dense baseline with a final/ export "
                      "(run or resume the ablation first)")


def load_run(run_dir: str | Path):
    """(trained dense model, its initial model W0 regenerated from the seed, the run's config)."""
    from distributed.config import load_config
    from distributed.export import load_final
    from distributed.schedule import build_plan
    from distributed.train import apply_stage, initial_model

    run_dir = Path(run_dir)
    model, _ = load_final(run_dir)   # first: it names what is wrong with a path that is no export
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} does not exist: give a run directory "
                                "(the trainer's out_dir), not its final/ folder")
    cfg = load_config(run_dir / "config.yaml")
    plan = build_plan(cfg)
    init = initial_model(cfg, plan)
    for stage in plan[1:]:        # blocks grown later are seeded by their index, not by time
        apply_stage(init, stage, cfg.seed)
    return model, init, cfg


def validation_sample(cfg, n_batches: int = 4):
    from data import build_token_cache, validation_batches

    cache = build_token_cache(cfg.data)
    batches = validation_batches(cache.val, batch_size=cfg.train.micro_batch_size,
                                 block_size=cfg.model.block_size, num_tokens=cfg.data.val_tokens)
    return batches[:n_batches]


def propose_grid(losses: dict[int, float], points: int, limit: int, loose: float = 0.5,
                 tight: float = 0.02) -> list[int]:
    """A log grid from the smallest value whose truncation costs <= `loose` nats to the smallest
    costing <= `tight`, both clipped to 1..limit."""
    from tune.rank_search import log_grid

    ordered = sorted(losses)
    lo = next((r for r in ordered if losses[r] <= loose), ordered[-1])
    hi = next((r for r in ordered if losses[r] <= tight), ordered[-1])
    lo, hi = min(lo, limit), min(max(hi, lo), limit)
    return log_grid(max(1, lo), hi, points)


def knob_rank(kind: str, knob: int) -> int:
    """The weight rank a kind's knob reaches (ABBA's r1 = r2 = r: up to r^2)."""
    return knob * knob if kind == "abba" else knob


def advise_sweep(run_dir: Path, config, plan) -> tuple[dict[str, list[int]], dict]:
    """Grids for the linear sites of a rank search from a trained dense run's truncation losses,
    and the advice table {site: {knob: predicted loss increase}} shown beside the sweep."""
    from tune.rank_search import log_grid

    model, _, cfg = load_run(run_dir)
    batches = validation_sample(cfg)
    grids, advice = {}, {}
    for site, spec in config.sites.items():
        if site not in SITES:
            continue
        limit = plan.break_even[site] - 1
        candidates = log_grid(1, limit, 6)
        by_rank = truncation_losses(model, batches, site,
                                    sorted({knob_rank(spec.kind, k) for k in candidates}))
        losses = {k: by_rank[knob_rank(spec.kind, k)] for k in candidates}
        grids[site] = propose_grid(losses, config.grid.points, limit)
        extra = [k for k in grids[site] if k not in losses]
        if extra:
            more = truncation_losses(model, batches, site, [knob_rank(spec.kind, k) for k in extra])
            losses.update({k: more[knob_rank(spec.kind, k)] for k in extra})
        advice[site] = {str(k): v for k, v in sorted(losses.items())}
    return grids, advice


def format_table(ranks: list[WeightRank], share: float) -> str:
    lines = [f"{'layer':>5}  {'site':9}  {'shape':>9}  {'full':>4}  {'W':>4}  {'W0':>4}  "
             f"{'W-W0':>5}  {'stable(W-W0)':>12}   ({share:.0%} energy ranks)"]
    for w in ranks:
        lines.append(f"{w.layer:>5}  {w.site:9}  {w.shape[0]:>4}x{w.shape[1]:<4}  {w.full_rank:>4}  "
                     f"{w.energy_rank:>4}  {w.init_energy_rank if w.init_energy_rank is not None else '-':>4}  "
                     f"{w.update_energy_rank if w.update_energy_rank is not None else '-':>5}  "
                     f"{w.update_stable_rank if w.update_stable_rank is not None else math.nan:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="How much rank a trained dense model's sites use: "
                                                 "the learned update W - W0 and truncation losses.")
    parser.add_argument("path", help="a finished dense run directory (config.yaml and final/)")
    parser.add_argument("--share", type=float, default=0.9,
                        help="share of the spectral energy for the energy ranks (default 0.9)")
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64",
                        help="ranks at which to measure the truncation loss (comma-separated)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not 0 < args.share <= 1:
        print(f"error: --share must be in (0, 1], got {args.share}", file=sys.stderr)
        return 2
    try:
        ranks = sorted({int(r) for r in args.ranks.split(",")})
        if ranks[0] < 1:
            raise ValueError(f"--ranks {args.ranks}: every rank must be >= 1")
        model, init, cfg = load_run(args.path)
        weights = update_ranks(model.state_dict(), init.state_dict(), args.share)
        batches = validation_sample(cfg)
        losses = {site: truncation_losses(model, batches, site, ranks) for site in SITES}
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SafetensorError, KeyError, RuntimeError, OSError) as exc:
        # a garbage or truncated model.safetensors, a config.json without its sections
        print(f"error: {args.path}: cannot read the final model ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else exc!r})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"share": args.share, "weights": [asdict(w) for w in weights],
                          "truncation_loss_increase": {s: {str(r): v for r, v in d.items()}
                                                       for s, d in losses.items()}}, indent=1))
        return 0
    print(format_table(weights, args.share))
    print("\nvalidation-loss increase when every block's site is truncated to rank r (nats/token):")
    print(f"{'site':9}  " + "  ".join(f"{r:>7}" for r in ranks))
    for site, d in losses.items():
        print(f"{site:9}  " + "  ".join(f"{d[r]:>+7.3f}" for r in ranks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
