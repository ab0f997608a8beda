"""The rank search: which rank should each approximation have?

    python -m tune.rank_search --config configs/rank_search/tiny.yaml [--from-ablation DIR] [key=value ...]

Three questions, answered in order (README, "Choosing ranks"):

1. **Sweep** -- how does each approximation's loss depend on its rank, alone? Every site in `sites`
   (attention qkv, attention proj, MLP fc, MLP proj, compressed attention) is switched on *alone*,
   the rest of the model dense, at each rank of a log grid strictly below the site's FLOPs
   break-even (the smallest rank at which the approximated model costs as many training FLOPs as the
   dense one, by model/accounting.py), for every seed. Beside them the dense model trains at the full
   budget and at `frontier.budgets` of its steps (each with its own complete LR schedule): the
   dense frontier every loss is judged against. Output: sweep.csv, sweep_<site>.png.
2. **Allocation** -- for a FLOPs budget (a fraction of dense), which rank for each site? From the
   sweep's curves, the ranks minimising the predicted loss within the budget (tune/allocation.py:
   greedy marginal analysis on each site's convex hull), then each allocation trained with
   `allocation.seeds` and measured against the dense frontier. Output: ranks.json, ranks.md,
   best.yaml (runs as-is with `python -m distributed.train --config best.yaml`).
3. **Refinement** (optional, `refine.enabled`) -- a joint Optuna search around the allocation
   (tune/rank_refine.py).

Every trial is one Ray Train run of the training loop (tune/trainable.py), run through the shared
Tune driver (tune/driver.py); re-running the command resumes. With `--from-ablation DIR` the rank
advisor (tune/rank_advisor.py) measures the ablation's dense baseline and proposes each site's grid.

Experiment directory: search.json (config, break-evens, grids, allocations), trials/<trial>/ (run
directories), tune_sweep/ and tune_allocation/ (Ray Tune's state), and the outputs above.
"""
from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from common import StrictModel as _Strict
from distributed.config import ConfigError, ExperimentConfig, apply_overrides, read_yaml, \
    validate_config
from model.config import SITES, GPTConfig
from tune.allocation import Option, allocate, mean_ci
from tune.frontier import (Frontier, FrontierSpec, compute_multiplier, frontier_name,
                           frontier_of_means, outside_frontier, scaled_train_overrides)
from tune.driver import RAY_TRAIN_DIR, TrialSpec, fingerprint, load_strict, parser, run_grid, \
    start_ray
from tune.driver import overrides as cli_overrides
from tune.grid import FailureSpec, ResourcesSpec, WandbSpec
from tune.results import OK, TRIAL_JSON, TRIALS, read_json, read_metrics, summarize_metrics, \
    write_json_atomic
from tune.trainable import TRAIN_FN
from tune.wandb_logging import wandb_callbacks

SEARCH_JSON = "search.json"
SWEEP_CSV = "sweep.csv"
RANKS_JSON = "ranks.json"
SWEEP_TUNE, ALLOCATION_TUNE = "tune_sweep", "tune_allocation"
ATTENTION = "attention"
DENSE = "dense"
METRICS = {"final": "final_val_loss", "before_finish": "val_loss_before_finish"}


# ------------------------------------------------------------------------------------------ kinds

@dataclass(frozen=True)
class Knob:
    """How one approximation kind is set from the one number a sweep varies (its "rank")."""

    kind: str
    name: str            # what the number means, for tables and plots

    def spec(self, value: int, fixed: dict, probe: bool = False) -> dict:
        """The approx spec at knob `value`. probe: for the break-even search, which must price
        settings the config would refuse (compressed attention costlier than full attention)."""
        if self.kind == "lowrank":
            return {"kind": "lowrank", "rank": value}
        if self.kind == "abba":   # r1 = r2 = value: the weight reaches rank value^2
            return {"kind": "abba", "r1": value, "r2": value}
        # compressed: slots varied, chunk and window from the site's `fixed`
        return {"kind": "compressed", "slots": value, **fixed, **({"allow_costlier": True} if probe else {})}

    def limit(self, model: GPTConfig, site: str, fixed: dict) -> int:
        """The largest value the config validation accepts (compressed: slots <= chunk)."""
        if site == ATTENTION:
            return min(fixed.get("chunk", model.block_size), model.block_size)
        return min(model.site_shape(site))


KNOBS = {"lowrank": Knob("lowrank", "rank"), "abba": Knob("abba", "r (r1 = r2; rank <= r^2)"),
         "compressed": Knob("compressed", "slots")}
LINEAR_KINDS, ATTENTION_KINDS = ("lowrank", "abba"), ("compressed",)


def with_site(model: GPTConfig, site: str, spec: dict | None, n_layer: int | None = None) -> GPTConfig:
    """`model` made dense everywhere, then `site` set to `spec` (None: stays dense) in every block."""
    approx = {} if spec is None else {site: spec}
    return GPTConfig.model_validate({**model.model_dump(exclude={"approx"}), "approx": approx,
                                     **({"n_layer": n_layer} if n_layer else {})})


@lru_cache(maxsize=4096)
def _block_flops(model_json: str) -> int:
    import torch

    from model import GPT

    with torch.device("meta"):  # shapes only: allocates nothing
        return GPT(GPTConfig.model_validate_json(model_json)).training_flops_per_token().blocks[0].training


def site_training_flops(model: GPTConfig, site: str, spec: dict | None) -> int:
    """Training FLOPs per token (model/accounting.py) of one fully trainable block of `model` with
    only `site` approximated by `spec`. Every block of a fully trainable model costs the same and
    the rest of the model does not depend on the site, so comparing one block compares the models
    (and builds a one-block model instead of n_layer blocks)."""
    return _block_flops(with_site(model, site, spec, n_layer=1).model_dump_json())


def break_even(model: GPTConfig, site: str, kind: str, fixed: dict | None = None) -> int:
    """The smallest knob value at which approximating `site` with `kind` costs at least the dense
    model's training FLOPs (knob values below it save FLOPs); limit + 1 when none does."""
    knob, fixed = KNOBS[kind], dict(fixed or {})
    dense = site_training_flops(model, site, None)
    lo, hi = 1, knob.limit(model, site, fixed) + 1   # invariant: break-even in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if site_training_flops(model, site, knob.spec(mid, fixed, probe=True)) >= dense:
            hi = mid
        else:
            lo = mid + 1
    return lo


def log_grid(low: int, high: int, points: int) -> list[int]:
    """Up to `points` distinct integers from low to high (inclusive), evenly spaced in log."""
    if high < low:
        return []
    if points == 1 or high == low:
        return [high]
    ratio = (high / low) ** (1 / (points - 1))
    return sorted({int(round(low * ratio ** i)) for i in range(points)})


# ----------------------------------------------------------------------------------------- config

class SiteSpec(_Strict):
    kind: str
    fixed: dict[str, int] = {}        # the kind's other settings (compressed: chunk, window)
    ranks: list[Annotated[int, Field(ge=1)]] | None = None   # an explicit grid; None: log grid below break-even
    low: int | None = Field(default=None, ge=1)   # this site's smallest grid value (default grid.low)

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in KNOBS:
            raise ValueError(f"kind {v!r} is not swept; valid: {', '.join(KNOBS)}")
        return v


class GridSpec(_Strict):
    points: int = Field(default=4, ge=1)     # grid values per site
    low: int = Field(default=2, ge=1)        # smallest value
    top: float = Field(default=0.75, gt=0.0, lt=1.0)  # largest value, as a share of the break-even


class AllocationSpec(_Strict):
    budgets: list[float] = [0.4, 0.6, 0.8]   # training FLOPs as fractions of the dense model's
    seeds: list[int] = Field(default=[1337, 1338, 1339], min_length=1)
    # which loss the curves and the allocation minimise: after the full-rank finish, or the
    # approximated model's own loss just before it
    metric: Literal["final", "before_finish"] = "final"

    @field_validator("budgets")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        if any(not 0 < b < 1 for b in v):
            raise ValueError(f"budgets {v}: each must be in (0, 1)")
        return sorted(set(v))


class RefineSpec(_Strict):
    """The optional joint Optuna search around the allocation (tune/rank_refine.py)."""

    enabled: bool = False
    budget: float | None = Field(default=None, gt=0, lt=1)  # the allocation it starts from (default: best.yaml's)
    # tpe: Optuna's TPESampler, one objective (val loss) with the FLOPs budget as a constraint;
    # nsga2: NSGAIISampler, two objectives (val loss, training FLOPs) -> a Pareto front.
    sampler: Literal["tpe", "nsga2"] = "tpe"
    num_samples: int = Field(default=16, ge=2)
    n_startup_trials: int = Field(default=4, ge=1)   # TPE's random trials before it models
    span: float = Field(default=2.0, gt=1.0)         # each rank searched within [r / span, r * span]
    seeds: list[int] = Field(default=[1337, 1338, 1339], min_length=1)  # the chosen point re-run
    sampler_seed: int = 0

    @model_validator(mode="after")
    def _startup(self) -> "RefineSpec":
        if self.sampler == "tpe" and self.n_startup_trials * 2 > self.num_samples:
            raise ValueError(f"n_startup_trials = {self.n_startup_trials} must be at most half of "
                             f"num_samples = {self.num_samples}, else TPE is mostly random search")
        return self


class RankSearchConfig(_Strict):
    name: str
    experiment: str                  # base experiment YAML; its approximations are replaced
    out_dir: str = "runs/rank-search"
    overrides: list[str] = []        # applied to every trial's experiment
    seeds: list[int] = Field(default=[1337, 1338], min_length=1)   # sweep and frontier
    sites: dict[str, SiteSpec]
    grid: GridSpec = GridSpec()
    frontier: FrontierSpec = FrontierSpec()
    allocation: AllocationSpec = AllocationSpec()
    refine: RefineSpec = RefineSpec()
    resources: ResourcesSpec = ResourcesSpec()
    failures: FailureSpec = FailureSpec()
    wandb: WandbSpec = WandbSpec()

    @model_validator(mode="after")
    def _sites(self) -> "RankSearchConfig":
        if not self.sites:
            raise ValueError("sites: at least one site is needed")
        valid = (*SITES, ATTENTION)
        for name, spec in self.sites.items():
            if name not in valid:
                raise ValueError(f"sites: {name!r} is not a site; valid: {', '.join(valid)}")
            kinds = ATTENTION_KINDS if name == ATTENTION else LINEAR_KINDS
            if spec.kind not in kinds:
                raise ValueError(f"sites.{name}.kind = {spec.kind!r}; valid: {', '.join(kinds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} has duplicates")
        return self


def load_rank_search(path: str | Path, overrides: list[str] | None = None) -> RankSearchConfig:
    return load_strict(RankSearchConfig, path, overrides)


# ----------------------------------------------------------------------------------------- trials

def base_experiment(config: RankSearchConfig) -> dict:
    """The base experiment with the search's overrides and every approximation off (read once, on
    the driver: trial processes do not share its working directory)."""
    raw = apply_overrides(read_yaml(config.experiment), config.overrides)
    raw["approx"] = {}
    validate_config(raw, source=config.experiment)
    return raw


def experiment_for(base: dict, *, seed: int, name: str, run_dir: str | Path,
                   approx: dict | None = None, steps_fraction: float = 1.0) -> ExperimentConfig:
    raw = apply_overrides(base, [f"seed={seed}"])
    raw["name"], raw["approx"] = name, dict(approx or {})
    raw["out_dir"] = str(run_dir)
    source = f"rank-search trial {name}"
    if steps_fraction != 1.0:   # a dense frontier point, scaled as the ablation's (tune/frontier.py)
        full = validate_config(raw, source=source)
        raw = apply_overrides(raw, scaled_train_overrides(full.train, steps_fraction, source))
    return validate_config(raw, source=source)


def estimated_training_flops(cfg: ExperimentConfig, world_size: int) -> float:
    """Training FLOPs of the whole run by the accounting, summed over the trainer's stage plan."""
    return _plan_flops(cfg.model_dump_json(exclude={"name", "out_dir", "seed"}), world_size)


@lru_cache(maxsize=1024)
def _plan_flops(cfg_json: str, world_size: int) -> float:
    from distributed.schedule import build_plan

    cfg = ExperimentConfig.model_validate_json(cfg_json)
    return float(sum(stage.flops for stage in build_plan(cfg, world_size=world_size)))


@dataclass(frozen=True)
class Plan:
    """What the sweep runs, resolved before Ray starts."""

    break_even: dict[str, int]
    grids: dict[str, list[int]]
    specs: list[TrialSpec]


def site_grid(config: RankSearchConfig, site: str, spec: SiteSpec, model: GPTConfig,
              advised: dict[str, list[int]] | None = None) -> tuple[int, list[int]]:
    even = break_even(model, site, spec.kind, spec.fixed)
    if spec.ranks is not None:
        grid = sorted(set(spec.ranks))
    elif advised and site in advised:
        grid = sorted(set(advised[site]))
    else:
        low = spec.low or config.grid.low
        grid = log_grid(low, min(even - 1, max(low, int(config.grid.top * even))), config.grid.points)
    over = [r for r in grid if r >= even]
    if over or not grid:
        raise ConfigError(f"sites.{site}: grid {grid} must be non-empty and strictly below the "
                          f"FLOPs break-even {even} ({KNOBS[spec.kind].name}); valid: 1..{even - 1}")
    return even, grid


def _spec(config: RankSearchConfig, experiment_dir: Path, cfg: ExperimentConfig, name: str,
          record: dict, train_fn: str) -> TrialSpec:
    return TrialSpec(trial_name=name, experiment=cfg.model_dump(mode="json"),
                     run_dir=str(experiment_dir / TRIALS / name),
                     ray_storage=str(experiment_dir / RAY_TRAIN_DIR),
                     resources=config.resources.model_dump(),
                     worker_restarts=config.failures.worker_restarts, train_fn=train_fn,
                     record=record)


def sweep_plan(config: RankSearchConfig, experiment_dir: Path, train_fn: str = TRAIN_FN,
               advised: dict[str, list[int]] | None = None) -> Plan:
    """Every sweep and dense-frontier trial, validated (a bad grid fails here, before Ray)."""
    base = base_experiment(config)
    model = experiment_for(base, seed=0, name="probe", run_dir="unused").model
    evens, grids, specs = {}, {}, []
    for seed in config.seeds:
        for fraction in (*config.frontier.budgets, 1.0):
            variant = DENSE if fraction == 1.0 else frontier_name(DENSE, fraction)
            name = f"{variant}_s{seed}"
            cfg = experiment_for(base, seed=seed, name=name, run_dir=experiment_dir / TRIALS / name,
                                 steps_fraction=fraction)
            specs.append(_spec(config, experiment_dir, cfg, name,
                               {"role": "frontier", "site": DENSE, "kind": DENSE, "rank": None,
                                "fraction": fraction, "seed": seed}, train_fn))
    for site, spec in config.sites.items():
        evens[site], grids[site] = site_grid(config, site, spec, model, advised)
        for rank in grids[site]:
            for seed in config.seeds:
                name = f"{site}-{spec.kind}-{rank}_s{seed}"
                cfg = experiment_for(base, seed=seed, name=name, run_dir=experiment_dir / TRIALS / name,
                                     approx={site: KNOBS[spec.kind].spec(rank, spec.fixed)})
                specs.append(_spec(config, experiment_dir, cfg, name,
                                   {"role": "sweep", "site": site, "kind": spec.kind, "rank": rank,
                                    "fraction": None, "seed": seed}, train_fn))
    return Plan(evens, grids, specs)


def check_space(config: RankSearchConfig) -> Plan:
    """Resolve and validate everything the sweep will run (used by cluster/submit.py too)."""
    return sweep_plan(config, Path(config.out_dir).resolve())


# ---------------------------------------------------------------------------------------- results

ROW_COLUMNS = ("trial", "status", "role", "site", "kind", "rank", "fraction", "seed",
               "loss_before_finish", "final_loss", "training_flops")


def collect_rows(experiment_dir: Path, specs: list[TrialSpec]) -> list[dict]:
    rows = []
    for spec in specs:
        run_dir = Path(spec.run_dir)
        info = read_json(run_dir / TRIAL_JSON) if (run_dir / TRIAL_JSON).is_file() else {}
        summary = summarize_metrics(read_metrics(run_dir))
        status = info.get("status", "not started")
        if status == OK and summary["final_val_loss"] is None:
            status = "no validation loss"
        rows.append({"trial": spec.trial_name, "status": status, **spec.record,
                     "loss_before_finish": summary["val_loss_before_finish"],
                     "final_loss": summary["final_val_loss"],
                     "training_flops": summary["training_flops"]})
    return rows


def write_rows(path: Path, rows: list[dict], columns: tuple[str, ...] = ROW_COLUMNS) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows)


def _loss(row: dict, metric: str) -> float | None:
    return row["final_loss"] if metric == "final" else row["loss_before_finish"]


def _ok(rows: list[dict], metric: str) -> list[dict]:
    return [r for r in rows if r["status"] == OK and _loss(r, metric) is not None
            and r["training_flops"] is not None]


def frontier_of(rows: list[dict], metric: str) -> tuple[Frontier | None, list[dict]]:
    """The dense frontier from this search's own dense runs, defined as the ablation report's
    (tune/frontier.py: mean loss per budget, interpolated in log FLOPs), and its points: one per
    fraction, mean and CI over seeds."""
    points = []
    dense = [r for r in _ok(rows, metric) if r["role"] == "frontier"]
    for fraction in sorted({r["fraction"] for r in dense}):
        group = [r for r in dense if r["fraction"] == fraction]
        mean, lo, hi = mean_ci([_loss(r, metric) for r in group])
        flops = sum(r["training_flops"] for r in group) / len(group)
        points.append({"fraction": fraction, "flops": flops, "loss": mean, "ci": [lo, hi],
                       "n": len(group)})
    return frontier_of_means({frontier_name(DENSE, p["fraction"]): (p["flops"], p["loss"])
                              for p in points}), points


def curves_of(rows: list[dict], metric: str) -> dict[str, list[dict]]:
    """Each site's measured curve: per rank, mean loss and CI over seeds, the paired loss delta
    against the dense run of the same seed, and the measured training FLOPs."""
    ok = _ok(rows, metric)
    dense = {r["seed"]: _loss(r, metric) for r in ok if r["role"] == "frontier" and r["fraction"] == 1.0}
    curves: dict[str, list[dict]] = {}
    for site in dict.fromkeys(r["site"] for r in ok if r["role"] == "sweep"):
        points = []
        for rank in sorted({r["rank"] for r in ok if r["site"] == site}):
            group = [r for r in ok if r["site"] == site and r["rank"] == rank]
            mean, lo, hi = mean_ci([_loss(r, metric) for r in group])
            deltas = [_loss(r, metric) - dense[r["seed"]] for r in group if r["seed"] in dense]
            points.append({"rank": rank, "kind": group[0]["kind"], "loss": mean, "ci": [lo, hi],
                           "delta": mean_ci(deltas)[0] if deltas else None, "n": len(group),
                           "flops": sum(r["training_flops"] for r in group) / len(group)})
        curves[site] = points
    return curves


# ------------------------------------------------------------------------------------- allocation

def plan_allocations(config: RankSearchConfig, curves: dict[str, list[dict]],
                     world_size: int) -> dict[str, dict]:
    """For every budget: the ranks that minimise the predicted loss (sum of the sites' measured loss
    deltas) within budget x the dense run's training FLOPs, costs by the accounting."""
    base = base_experiment(config)
    dense_flops = estimated_training_flops(
        experiment_for(base, seed=0, name="probe", run_dir="unused"), world_size)
    options: dict[str, list[Option]] = {}
    for site, points in curves.items():
        kind = config.sites[site].kind
        opts = [Option(None, 0.0, 0.0)]
        for p in points:
            if p["delta"] is None:
                continue
            cfg = experiment_for(base, seed=0, name="probe", run_dir="unused",
                                 approx={site: KNOBS[kind].spec(p["rank"], config.sites[site].fixed)})
            opts.append(Option(p["rank"], estimated_training_flops(cfg, world_size) - dense_flops,
                               p["delta"]))
        options[site] = opts
    out = {}
    for budget in config.allocation.budgets:
        chosen = allocate(options, (budget - 1.0) * dense_flops) if options else None
        if chosen is None:
            out[f"{budget:g}"] = {"budget": budget, "feasible": False}
            continue
        approx = {s: KNOBS[config.sites[s].kind].spec(o.knob, config.sites[s].fixed)
                  for s, o in chosen.items() if o.knob is not None}
        cfg = experiment_for(base, seed=0, name="probe", run_dir="unused", approx=approx)
        flops = estimated_training_flops(cfg, world_size)
        # a site without a finished sweep point stays dense
        ranks = {s: (chosen[s].knob if s in chosen else None) for s in config.sites}
        out[f"{budget:g}"] = {"budget": budget, "feasible": True, "ranks": ranks,
                              "kinds": {s: config.sites[s].kind for s in config.sites},
                              "approx": approx,
                              "predicted_loss_delta": sum(o.loss for o in chosen.values()),
                              "estimated_flops": flops, "dense_flops": dense_flops,
                              "fits": flops <= budget * dense_flops}
    return out


def allocation_specs(config: RankSearchConfig, experiment_dir: Path, allocations: dict[str, dict],
                     train_fn: str = TRAIN_FN) -> list[TrialSpec]:
    base = base_experiment(config)
    specs = []
    for key, alloc in allocations.items():
        if not alloc["feasible"]:
            continue
        for seed in config.allocation.seeds:
            name = f"alloc@{key}_s{seed}"
            cfg = experiment_for(base, seed=seed, name=name, run_dir=experiment_dir / TRIALS / name,
                                 approx=alloc["approx"])
            specs.append(_spec(config, experiment_dir, cfg, name,
                               {"role": "allocation", "site": "all", "kind": "allocation",
                                "rank": None, "fraction": alloc["budget"], "seed": seed}, train_fn))
    return specs


def summarize_allocations(allocations: dict[str, dict], rows: list[dict], metric: str,
                          frontier: Frontier | None) -> dict[str, dict]:
    """ranks.json: per budget, the ranks, the measured loss with its CI and the compute multiplier
    against the dense frontier (None outside it)."""
    ok = _ok(rows, metric)
    out = {}
    for key, alloc in allocations.items():
        if not alloc["feasible"]:
            out[key] = {"feasible": False}
            continue
        group = [r for r in ok if r["role"] == "allocation" and r["fraction"] == alloc["budget"]]
        mean, lo, hi = mean_ci([_loss(r, metric) for r in group])
        flops = sum(r["training_flops"] for r in group) / len(group) if group else None
        mult = compute_multiplier(frontier, mean, flops) if frontier and group else None
        mult_ci = [compute_multiplier(frontier, hi, flops) if hi is not None else None,
                   compute_multiplier(frontier, lo, flops) if lo is not None else None] \
            if frontier and group else [None, None]
        outside, bound = outside_frontier(frontier, mean, flops) if frontier and group else (None, None)
        out[key] = {**alloc["ranks"], "loss": mean if group else None, "ci": [lo, hi],
                    "compute_multiplier": mult, "compute_multiplier_ci": mult_ci,
                    "outside_frontier": outside, "compute_multiplier_bound": bound,
                    "n_seeds": len(group), "training_flops": flops,
                    "flops_fraction": alloc["estimated_flops"] / alloc["dense_flops"],
                    "fits_budget": alloc["fits"], "kinds": alloc["kinds"],
                    "predicted_loss_delta": alloc["predicted_loss_delta"]}
    return out


def _payoff(entry: dict) -> float | None:
    """The multiplier, or for an allocation below the frontier's best loss its lower bound."""
    if entry.get("compute_multiplier") is not None:
        return entry["compute_multiplier"]
    return entry.get("compute_multiplier_bound") if entry.get("outside_frontier") == "below" else None


def choose_best(summary: dict[str, dict]) -> str | None:
    """The budget whose allocation pays off most against the dense frontier: the highest compute
    multiplier, where an allocation that beats the whole frontier counts with its lower bound;
    without either anywhere, the lowest measured loss."""
    done = {k: v for k, v in summary.items() if v.get("loss") is not None and not math.isnan(v["loss"])}
    if not done:
        return None
    with_payoff = {k: _payoff(v) for k, v in done.items() if _payoff(v) is not None}
    if with_payoff:
        return max(with_payoff, key=with_payoff.get)
    return min(done, key=lambda k: done[k]["loss"])


def write_best_yaml(config: RankSearchConfig, experiment_dir: Path, key: str,
                    allocation: dict, summary: dict) -> Path:
    cfg = experiment_for(base_experiment(config), seed=config.allocation.seeds[0],
                         name=f"{config.name}-best", run_dir=f"runs/{config.name}-best",
                         approx=allocation["approx"])
    raw = cfg.to_yaml_dict()
    raw["data"].pop("cache_dir", None)   # the machine-local default, wherever best.yaml runs
    loss, mult = summary.get("loss"), summary.get("compute_multiplier")
    header = (f"# Chosen by the rank search {config.name!r}: the allocation for {float(key):.0%} of "
              f"the dense training FLOPs (measured loss {loss if loss is None else round(loss, 4)}, "
              f"compute multiplier {mult if mult is None else round(mult, 3)}).\n"
              f"# Run it: python -m distributed.train --config {experiment_dir / 'best.yaml'}\n")
    path = experiment_dir / "best.yaml"
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def _fmt(v, spec: str = ".4f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def ranks_markdown(config: RankSearchConfig, plan: Plan, curves: dict[str, list[dict]],
                   frontier_points: list[dict], summary: dict[str, dict], best: str | None,
                   advice: dict | None = None) -> str:
    metric = config.allocation.metric
    sites = list(config.sites)
    lines = [f"# Rank search `{config.name}`", "",
             f"Loss: {'final (after the full-rank finish)' if metric == 'final' else 'before the full-rank finish'}"
             f" validation loss, nats/token; mean over seeds with a 95% t interval.", "",
             "## Allocations", "",
             "Ranks chosen from the sweep curves to minimise the predicted loss within each FLOPs "
             "budget, then trained and measured. Compute multiplier: training FLOPs the dense "
             "frontier needs for the same loss ÷ the allocation's (> 1: it pays off). Outside the "
             "frontier only a bound holds: a loss below the full dense run's gives '> b', one above "
             "the cheapest dense point's '< b'.", "",
             "| budget | " + " | ".join(sites) + " | FLOPs (of dense) | loss | 95% CI | compute multiplier |",
             "|---" * (len(sites) + 5) + "|"]
    for key, s in summary.items():
        if not s.get("feasible", True):
            lines.append(f"| {float(key):.0%} | " + " | ".join("" for _ in sites)
                         + " | infeasible with the swept ranks | | | |")
            continue
        ranks = " | ".join(DENSE if s.get(site) is None else f"{s['kinds'][site]} {s[site]}"
                           for site in sites)
        lo, hi = s["ci"]
        mlo, mhi = s["compute_multiplier_ci"]
        mark = " **(best.yaml)**" if key == best else ""
        if s["compute_multiplier"] is None and s.get("outside_frontier"):
            sign, where = (">", "beats the full dense run") if s["outside_frontier"] == "below" \
                else ("<", "worse than the cheapest dense point")
            multiplier = f"{sign} {s['compute_multiplier_bound']:.2f} ({where})"
        else:
            multiplier = f"{_fmt(s['compute_multiplier'], '.2f')} [{_fmt(mlo, '.2f')}, {_fmt(mhi, '.2f')}]"
        lines.append(f"| {float(key):.0%}{mark} | {ranks} | {s['flops_fraction']:.2f} | "
                     f"{_fmt(s['loss'])} | [{_fmt(lo)}, {_fmt(hi)}] | {multiplier} |")
    lines += ["", "## Dense frontier", "", "| fraction of steps | training FLOPs | loss | 95% CI |",
              "|---|---|---|---|"]
    for p in frontier_points:
        lines.append(f"| {p['fraction']:g} | {p['flops']:.3e} | {_fmt(p['loss'])} | "
                     f"[{_fmt(p['ci'][0])}, {_fmt(p['ci'][1])}] |")
    lines += ["", "## Sweeps (each site alone, the rest dense)", ""]
    for site in sites:
        kind = config.sites[site].kind
        lines += [f"### {site} ({kind}; {KNOBS[kind].name}; FLOPs break-even {plan.break_even[site]})",
                  "", "| value | loss | 95% CI | Δ vs dense (paired) | training FLOPs |"
                  + (" advisor Δ (truncation) |" if advice else ""),
                  "|---|---|---|---|---|" + ("---|" if advice else "")]
        for p in curves.get(site, []):
            predicted = ""
            if advice:
                predicted = f" {_fmt((advice.get(site) or {}).get(str(p['rank'])))} |"
            lines.append(f"| {p['rank']} | {_fmt(p['loss'])} | [{_fmt(p['ci'][0])}, {_fmt(p['ci'][1])}] "
                         f"| {_fmt(p['delta'], '+.4f')} | {p['flops']:.3e} |{predicted}")
        lines.append(f"\n![{site}](sweep_{site}.png)\n")
    return "\n".join(lines) + "\n"


def plot_sweeps(experiment_dir: Path, config: RankSearchConfig, plan: Plan,
                curves: dict[str, list[dict]], frontier_points: list[dict]) -> list[Path]:
    """sweep_<site>.png: loss vs rank, and loss vs training FLOPs with the dense frontier."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def bars(points):
        ys = [p["loss"] for p in points]
        err = [[0 if p["ci"][0] is None else p["loss"] - p["ci"][0] for p in points],
               [0 if p["ci"][1] is None else p["ci"][1] - p["loss"] for p in points]]
        return ys, err

    out = []
    dense_full = next((p for p in frontier_points if p["fraction"] == 1.0), None)
    for site in config.sites:
        points = curves.get(site, [])
        kind = config.sites[site].kind
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        if points:
            ys, err = bars(points)
            left.errorbar([p["rank"] for p in points], ys, yerr=err, fmt="o-", capsize=3,
                          label=f"{site} {kind}")
            right.errorbar([p["flops"] for p in points], ys, yerr=err, fmt="o", capsize=3,
                           label=f"{site} {kind}")
            for p in points:
                right.annotate(str(p["rank"]), (p["flops"], p["loss"]), fontsize=8,
                               textcoords="offset points", xytext=(4, 4))
        if dense_full is not None:
            left.axhline(dense_full["loss"], color="black", linestyle="--", label="dense")
            if dense_full["ci"][0] is not None:
                left.axhspan(dense_full["ci"][0], dense_full["ci"][1], color="black", alpha=0.1)
        left.axvline(plan.break_even[site], color="tab:red", linestyle=":", label="FLOPs break-even")
        if frontier_points:
            ys, err = bars(frontier_points)
            right.errorbar([p["flops"] for p in frontier_points], ys, yerr=err, fmt="s-",
                           color="black", capsize=3, label="dense frontier")
        left.set_xscale("log")   # the grid is logarithmic; label its own values
        left.set_xticks(sorted({*plan.grids[site], plan.break_even[site]}))
        left.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        left.set_xlabel(KNOBS[kind].name)
        right.set_xlabel("training FLOPs (the run's, by the accounting)")
        for ax in (left, right):
            ax.set_ylabel("validation loss (nats/token)")
            ax.legend(fontsize=8)
        fig.suptitle(f"{config.name}: {site} alone ({kind}), rest dense")
        fig.tight_layout()
        path = experiment_dir / f"sweep_{site}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


# ------------------------------------------------------------------------------------------ run

def _check_fingerprint(experiment_dir: Path, phase: str, specs: list[TrialSpec]) -> None:
    path = experiment_dir / SEARCH_JSON
    record = read_json(path) if path.is_file() else {}
    fp = fingerprint(specs)
    previous = record.get("fingerprints", {}).get(phase)
    if previous is not None and previous != fp:
        raise ConfigError(f"{experiment_dir} holds a rank search whose {phase} trials differ from "
                          "this config's; use another out_dir (or --out-dir) or delete it to start over")
    record.setdefault("fingerprints", {})[phase] = fp
    write_json_atomic(path, record)


def _update_search_json(experiment_dir: Path, **fields) -> None:
    path = experiment_dir / SEARCH_JSON
    record = read_json(path) if path.is_file() else {}
    record.update(fields)
    write_json_atomic(path, record)


def run_rank_search(config: RankSearchConfig, experiment_dir: Path, *, address: str | None = None,
                    train_fn: str = TRAIN_FN, worker_logs: bool = False,
                    advised: dict[str, list[int]] | None = None, advice: dict | None = None) -> dict:
    """Sweep, allocate, train the allocations, write every output; returns ranks.json's content."""
    experiment_dir = experiment_dir.resolve()
    experiment_dir.mkdir(parents=True, exist_ok=True)
    plan = sweep_plan(config, experiment_dir, train_fn, advised)
    _check_fingerprint(experiment_dir, "sweep", plan.specs)
    _update_search_json(experiment_dir, config=config.model_dump(mode="json"),
                        break_even=plan.break_even, grids=plan.grids, advice=advice)
    start_ray(address, worker_logs)
    res, fail = config.resources, config.failures
    callbacks = wandb_callbacks(config.wandb, config.name, experiment_dir,
                                {s.trial_name: s.identity() for s in plan.specs})
    run_grid(experiment_dir, SWEEP_TUNE, plan.specs, max_concurrent=res.max_concurrent_trials,
             trial_retries=fail.trial_retries, callbacks=callbacks)

    sweep = sweep_outputs(config, experiment_dir, plan)
    allocations = plan_allocations(config, sweep.curves, res.workers_per_trial)
    _update_search_json(experiment_dir, allocations=allocations)
    alloc_specs = allocation_specs(config, experiment_dir, allocations, train_fn)
    if alloc_specs:
        _check_fingerprint(experiment_dir, "allocation", alloc_specs)
        run_grid(experiment_dir, ALLOCATION_TUNE, alloc_specs,
                 max_concurrent=res.max_concurrent_trials, trial_retries=fail.trial_retries,
                 callbacks=wandb_callbacks(config.wandb, config.name, experiment_dir,
                                           {s.trial_name: s.identity() for s in alloc_specs}))
    return allocation_outputs(config, experiment_dir, plan, sweep, allocations, alloc_specs, advice)


@dataclass(frozen=True)
class Sweep:
    rows: list[dict]
    curves: dict[str, list[dict]]
    frontier: Frontier | None
    frontier_points: list[dict]


def sweep_outputs(config: RankSearchConfig, experiment_dir: Path, plan: Plan) -> Sweep:
    """sweep.csv and the per-site plots from the trial directories (files only: reruns anywhere)."""
    metric = config.allocation.metric
    rows = collect_rows(experiment_dir, plan.specs)
    write_rows(experiment_dir / SWEEP_CSV, rows)
    curves = curves_of(rows, metric)
    frontier, frontier_points = frontier_of(rows, metric)
    plot_sweeps(experiment_dir, config, plan, curves, frontier_points)
    return Sweep(rows, curves, frontier, frontier_points)


def allocation_outputs(config: RankSearchConfig, experiment_dir: Path, plan: Plan, sweep: Sweep,
                       allocations: dict[str, dict], alloc_specs: list[TrialSpec],
                       advice: dict | None = None) -> dict:
    """allocations.csv, ranks.json, ranks.md and best.yaml from the allocation trials."""
    alloc_rows = collect_rows(experiment_dir, alloc_specs)
    write_rows(experiment_dir / "allocations.csv", alloc_rows)
    summary = summarize_allocations(allocations, alloc_rows, config.allocation.metric, sweep.frontier)
    best = choose_best(summary)
    write_json_atomic(experiment_dir / RANKS_JSON, summary)
    if best is not None:
        write_best_yaml(config, experiment_dir, best, allocations[best], summary[best])
    (experiment_dir / "ranks.md").write_text(
        ranks_markdown(config, plan, sweep.curves, sweep.frontier_points, summary, best, advice))
    return {"summary": summary, "best": best, "rows": sweep.rows + alloc_rows}


def main(argv: list[str] | None = None) -> int:
    p = parser("Which rank should each approximation have: per-site sweeps, a budgeted allocation "
               "and (optionally) a joint Optuna refinement, on Ray Tune.",
               "rank-search YAML, e.g. configs/rank_search/tiny.yaml")
    p.add_argument("--from-ablation", help="an ablation's experiment directory: the rank advisor "
                                           "measures its dense baseline and proposes each site's grid")
    args = p.parse_args(argv)
    try:
        config = load_rank_search(args.config, cli_overrides(args))
        plan = check_space(config)
        advised = advice = None
        if args.from_ablation:
            from tune.rank_advisor import advise_sweep, dense_baseline_run

            advised, advice = advise_sweep(dense_baseline_run(Path(args.from_ablation)), config, plan)
            plan = sweep_plan(config, Path(config.out_dir).resolve(), advised=advised)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_sweep = sum(s.record["role"] == "sweep" for s in plan.specs)
    n_alloc = sum(1 for _ in config.allocation.budgets) * len(config.allocation.seeds)
    print(f"rank search {config.name!r}: {n_sweep} sweep + {len(plan.specs) - n_sweep} dense-frontier "
          f"trials, then up to {n_alloc} allocation trials", flush=True)
    for site, grid in plan.grids.items():
        print(f"  {site:9s} {config.sites[site].kind:9s} {grid}  (break-even {plan.break_even[site]})")
    experiment_dir = Path(config.out_dir).resolve()
    start = time.time()
    try:
        result = run_rank_search(config, experiment_dir, address=args.address,
                                 worker_logs=args.worker_logs, advised=advised, advice=advice)
        if config.refine.enabled and result["best"] is not None:
            from tune.rank_refine import run_refinement

            run_refinement(config, experiment_dir, result, address=args.address)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nrank search {config.name!r}: done in {time.time() - start:.0f} s")
    print((experiment_dir / "ranks.md").read_text().split("## Dense frontier")[0])
    for name in (SWEEP_CSV, RANKS_JSON, "ranks.md", "best.yaml", "refined.yaml"):
        if (experiment_dir / name).is_file():
            print(f"  {name:12s} {experiment_dir / name}")
    print(f"  {'plots':12s} {experiment_dir}/sweep_<site>.png")
    failed = [r["trial"] for r in result["rows"] if r["status"] != OK]
    if failed:
        print(f"{len(failed)} trial(s) have no result: {', '.join(failed)}; re-run the same command "
              "to retry them", file=sys.stderr)
    if result["best"] is None:
        print("no allocation finished; best.yaml not written", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    # Run main from the importable module, not from __main__: Ray pickles the trial specs, and
    # classes defined in __main__ would be pickled by value.
    from tune.rank_search import main as module_main

    sys.exit(module_main())
