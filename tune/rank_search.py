"""The rank search: which rank of each approximation buys the most validation loss per training FLOP.

    python -m tune.rank_search --config configs/rank_search/tiny.yaml [--from-ablation DIR] [key=value ...]

Optuna proposes ranks through Ray Tune (`OptunaSearch`); every trial is one Ray Train run of the
training loop, exactly like an ablation trial (tune/trainable.py). Two modes:

* multi-objective (default; `search.flops_budget: null`): minimise (val loss, training FLOPs) with
  Optuna's multi-objective TPE; the result is the Pareto front. ASHA is *not* used here: a trial it
  stops early reports a low-FLOPs, high-loss partial result that Optuna would take as a finished
  trial and that could even sit on the front. The scheduler section is ignored in this mode.
* single-objective (`search.flops_budget: N`): minimise val loss among rank settings whose
  estimated training FLOPs (the stage plan's accounting) fit the budget, with ASHA stopping poor
  trials early (on val loss, in optimizer steps). A setting over budget is not trained; it scores
  ln(vocab_size), the loss of a uniform guess.

Rank advisor seeding: with `--from-ablation DIR` the ablation's dense baseline export is analysed
(tune/rank_advisor.py) and the ranks keeping 80%, 90% and 95% (around `search.energy_share`) of each
weight's spectral energy are the search's first points.

Outputs in the experiment directory: pareto.csv (every finished trial, front marked), pareto.png,
best.yaml (the chosen trial's full experiment config; it runs as-is with
`python -m distributed.train --config best.yaml`), and per-trial run directories under trials/.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from common import StrictModel as _Strict
from common import format_validation_error
from distributed.config import ConfigError, ExperimentConfig, apply_overrides, read_yaml, \
    validate_config
from tune.analysis import pareto_front
from tune.grid import FailureSpec, ResourcesSpec, WandbSpec
from tune.results import (EXPERIMENT_JSON, OK, TRIAL_JSON, TRIALS, read_json, read_metrics,
                          summarize_metrics, write_json_atomic)
from tune.trainable import DRIVER_RESOURCES, TRAIN_ENV, TRAIN_FN, run_trial
from tune.wandb_logging import wandb_callbacks

TUNE_DIR = "tune"
PARAMS_JSON = "params.json"
STOPPED = "stopped early"


class ParamSpec(_Strict):
    type: Literal["int", "float", "categorical"] = "int"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "ParamSpec":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs `choices`")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"needs low <= high (got low={self.low}, high={self.high})")
        elif self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got low={self.low})")
        return self


class SearchSpec(_Strict):
    num_samples: int = Field(default=16, ge=1)
    objectives: dict[str, Literal["min", "max"]] = {"val_loss": "min", "training_flops": "min"}
    flops_budget: float | None = Field(default=None, gt=0)   # set: single objective under a budget
    energy_share: float = Field(default=0.9, gt=0.0, lt=1.0)  # rank advisor, for the seed points
    seed: int = 0                                             # Optuna's sampler


class SchedulerSpec(_Strict):
    """ASHA, single-objective mode only; in optimizer steps."""
    grace_period: int = Field(default=100, ge=1)
    reduction_factor: float = Field(default=3, gt=1)
    max_t: int = Field(default=1000, ge=1)


class RankSearchConfig(_Strict):
    name: str
    experiment: str
    out_dir: str = "runs/rank-search"
    seed: int = 1337
    overrides: list[str] = []
    space: dict[str, ParamSpec]
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    failures: FailureSpec = FailureSpec()
    wandb: WandbSpec = WandbSpec()

    @model_validator(mode="after")
    def _objectives(self) -> "RankSearchConfig":
        if not self.space:
            raise ValueError("space: at least one parameter is needed")
        if self.search.flops_budget is None and len(self.search.objectives) != 2:
            raise ValueError("search.objectives: the multi-objective mode needs two objectives "
                             "(val_loss and training_flops); set search.flops_budget for one")
        return self

    @property
    def multi_objective(self) -> bool:
        return self.search.flops_budget is None


def load_rank_search(path: str | Path, overrides: list[str] | None = None) -> RankSearchConfig:
    raw = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        return RankSearchConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


def _format(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def base_experiment(config: RankSearchConfig) -> dict:
    """The base experiment YAML with the search's shared overrides, read once on the driver (trial
    processes do not share its working directory)."""
    raw = apply_overrides(read_yaml(config.experiment), config.overrides + [f"seed={config.seed}"])
    validate_config(raw, source=config.experiment)
    return raw


def trial_experiment(base: dict, params: dict[str, Any], run_dir: str | Path) -> ExperimentConfig:
    """The experiment config of one sampled rank setting."""
    raw = apply_overrides(base, [f"{k}={_format(v)}" for k, v in params.items()])
    raw["out_dir"] = str(run_dir)
    return validate_config(raw, source=f"rank-search trial [ranks {params}]")


def estimated_training_flops(cfg: ExperimentConfig, world_size: int) -> float:
    from distributed.schedule import build_plan

    return float(sum(stage.flops for stage in build_plan(cfg, world_size=world_size)))


def check_space(config: RankSearchConfig) -> None:
    """Both corners of the space must give valid configs, so a bad bound fails before Ray starts."""
    base = base_experiment(config)
    for corner in ("low", "high"):
        params = {k: (p.choices[0] if p.type == "categorical" else
                      (int(getattr(p, corner)) if p.type == "int" else getattr(p, corner)))
                  for k, p in config.space.items()}
        trial_experiment(base, params, "unused")


def tune_space(config: RankSearchConfig) -> dict:
    from ray import tune

    out = {}
    for key, p in config.space.items():
        if p.type == "categorical":
            out[key] = tune.choice(p.choices)
        elif p.type == "int":
            # randint's upper bound is exclusive
            out[key] = (tune.lograndint if p.log else tune.randint)(int(p.low), int(p.high) + 1)
        else:
            out[key] = (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
    return out


def advisor_points(config: RankSearchConfig, export_dir: Path) -> list[dict]:
    """Seed points from the dense baseline's spectra: shares around search.energy_share."""
    from tune.rank_advisor import load_spectra, ranks_at, suggested_ranks

    share = config.search.energy_share
    base = trial_experiment(base_experiment(config), {}, "unused").to_yaml_dict()
    weights = load_spectra(export_dir)
    points = []
    for s in sorted({max(0.05, share - (1 - share)), share, share + (1 - share) / 2}):
        suggestion = suggested_ranks(ranks_at(weights, s))
        point = {}
        for key, p in config.space.items():
            if p.type == "categorical":
                continue
            value = suggestion.get(key)
            if value is None:  # e.g. the Linformer k: not a weight's rank; keep the base value
                value = _lookup(base, key)
            if value is None:
                continue
            value = min(max(value, p.low), p.high)
            point[key] = int(round(value)) if p.type == "int" else float(value)
        if len(point) == len(config.space) and point not in points:
            points.append(point)
    return points


def _lookup(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def dense_baseline_export(ablation_dir: Path) -> Path:
    spec = read_json(ablation_dir / EXPERIMENT_JSON)
    for trial in spec["trials"]:
        run_dir = ablation_dir / TRIALS / trial["trial_name"]
        if trial["baseline"] and (run_dir / "final" / "config.json").is_file():
            return run_dir / "final"
    raise ConfigError(f"{ablation_dir}: no finished dense baseline with a final/ export "
                      "(run or resume the ablation first)")


def rank_trial_driver(config: dict, search: dict) -> None:
    """The rank search's Tune function trainable: `config` holds Optuna's sampled ranks."""
    import ray.tune

    params = {k: config[k] for k in search["space_keys"]}
    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(search["experiment_dir"]) / TRIALS / trial_id
    rs = RankSearchConfig.model_validate(search["config"])
    cfg = trial_experiment(search["base_experiment"], params, run_dir)
    write_json_atomic(run_dir / PARAMS_JSON, params)
    world = rs.resources.workers_per_trial
    budget = rs.search.flops_budget
    if budget is not None and estimated_training_flops(cfg, world) > budget:
        # Not trained: the uniform-guess loss ranks it below any trained setting.
        write_json_atomic(run_dir / TRIAL_JSON, {"trial_name": trial_id, "status": "over budget",
                                                 "attempts": 1})
        ray.tune.report({"val_loss": math.log(cfg.model.vocab_size), "over_budget": True,
                         "step": rs.scheduler.max_t, "done": True})
        return
    run_trial({"trial": {"trial_name": trial_id, "params": params},
               "experiment": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
               "ray_storage": str(Path(search["experiment_dir"]) / "ray_train"),
               "resources": rs.resources.model_dump(),
               "worker_restarts": rs.failures.worker_restarts,
               "train_fn": search["train_fn"]})


def collect_trials(experiment_dir: Path, space_keys: list[str]) -> list[dict]:
    rows = []
    for run_dir in sorted((experiment_dir / TRIALS).glob("*")):
        if not (run_dir / PARAMS_JSON).is_file():
            continue
        info = read_json(run_dir / TRIAL_JSON) if (run_dir / TRIAL_JSON).is_file() else {}
        summary = summarize_metrics(read_metrics(run_dir))
        status = info.get("status", "not started")
        params = read_json(run_dir / PARAMS_JSON)
        rows.append({"trial": run_dir.name, "status": status,
                     **{k: params.get(k) for k in space_keys},
                     "final_val_loss": summary["final_val_loss"],
                     "training_flops": summary["training_flops"],
                     "tokens": summary["tokens"], "wall_time_s": info.get("wall_time_s")})
    return rows


def write_outputs(experiment_dir: Path, config: RankSearchConfig) -> tuple[list[dict], dict | None]:
    """pareto.csv, pareto.png and best.yaml from the trial directories; returns (rows, best)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(config.space)
    rows = collect_trials(experiment_dir, keys)
    done = [r for r in rows if r["status"] == OK and r["final_val_loss"] is not None
            and r["training_flops"] is not None]
    front = {id(done[i]) for i in pareto_front([(r["training_flops"], r["final_val_loss"]) for r in done])}
    for r in rows:
        r["pareto"] = int(id(r) in front)
    rows.sort(key=lambda r: (r["training_flops"] is None, r["training_flops"] or 0.0))
    columns = ["trial", "status", "pareto", "final_val_loss", "training_flops", *keys, "tokens",
               "wall_time_s"]
    with (experiment_dir / "pareto.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    best = choose_best([r for r in done if r["pareto"]], config.search.flops_budget)
    if best is not None:
        cfg = trial_experiment(base_experiment(config), {k: best[k] for k in keys},
                               f"runs/{config.name}-best")
        raw = cfg.to_yaml_dict()
        raw["data"].pop("cache_dir", None)  # the machine-local default, wherever best.yaml runs
        raw["name"] = f"{config.name}-best"
        header = (f"# Chosen by the rank search {config.name!r} (trial {best['trial']}): val loss "
                  f"{best['final_val_loss']:.4f}, {best['training_flops']:.3e} training FLOPs.\n"
                  f"# Run it: python -m distributed.train --config {experiment_dir / 'best.yaml'}\n")
        (experiment_dir / "best.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False))

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([r["training_flops"] for r in done], [r["final_val_loss"] for r in done],
               color="tab:gray", label="finished trials")
    front_rows = sorted((r for r in done if r["pareto"]), key=lambda r: r["training_flops"])
    ax.plot([r["training_flops"] for r in front_rows], [r["final_val_loss"] for r in front_rows],
            "o-", color="tab:blue", label="Pareto front")
    if best is not None:
        ax.scatter([best["training_flops"]], [best["final_val_loss"]], s=120, facecolors="none",
                   edgecolors="tab:red", label="best.yaml")
    if config.search.flops_budget:
        ax.axvline(config.search.flops_budget, color="tab:red", linestyle="--", label="FLOPs budget")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"rank search {config.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(experiment_dir / "pareto.png", dpi=130)
    plt.close(fig)
    return rows, best


def choose_best(front: list[dict], flops_budget: float | None) -> dict | None:
    """Under a budget: the lowest loss that fits. Otherwise the front's knee: the point farthest
    from the straight line joining the front's two ends, in (log FLOPs, loss) scaled to [0, 1]."""
    if not front:
        return None
    if flops_budget is not None:
        fitting = [r for r in front if r["training_flops"] <= flops_budget]
        return min(fitting, key=lambda r: r["final_val_loss"]) if fitting else None
    if len(front) <= 2:
        return min(front, key=lambda r: r["final_val_loss"])
    xs = [math.log(r["training_flops"]) for r in front]
    ys = [r["final_val_loss"] for r in front]

    def scale(v, lo, hi):
        return (v - lo) / (hi - lo) if hi > lo else 0.0

    pts = [(scale(x, min(xs), max(xs)), scale(y, min(ys), max(ys))) for x, y in zip(xs, ys)]
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    norm = math.hypot(x1 - x0, y1 - y0) or 1.0
    distance = [abs((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) / norm for x, y in pts]
    return front[max(range(len(front)), key=distance.__getitem__)]


def run_search(config: RankSearchConfig, experiment_dir: Path, *, points: list[dict],
               address: str | None = None, train_fn: str = TRAIN_FN,
               worker_logs: bool = False) -> None:
    import os

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    experiment_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(experiment_dir / "search.json",
                      {"config": config.model_dump(mode="json"), "points_to_evaluate": points})
    os.environ.update(TRAIN_ENV)
    # The trainer's reports carry what it measured at that point (an early one may lack a key the
    # searcher wants); Optuna reads the final report, which run_trial makes complete.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=worker_logs)
    search = {"space_keys": list(config.space), "experiment_dir": str(experiment_dir),
              "base_experiment": base_experiment(config),
              "config": config.model_dump(mode="json"), "train_fn": train_fn}
    trainable = tune.with_resources(tune.with_parameters(rank_trial_driver, search=search),
                                    DRIVER_RESOURCES)
    tune_dir = experiment_dir / TUNE_DIR
    if tune.Tuner.can_restore(str(tune_dir)):
        print(f"resuming the search in {tune_dir}", flush=True)
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        if config.multi_objective:
            searcher = OptunaSearch(metric=list(config.search.objectives),
                                    mode=list(config.search.objectives.values()),
                                    points_to_evaluate=points or None, seed=config.search.seed)
            scheduler = None
        else:
            searcher = OptunaSearch(metric="val_loss", mode="min", points_to_evaluate=points or None,
                                    seed=config.search.seed)
            s = config.scheduler
            # stop_last_trials=False: a trial that reaches max_t finishes its run (and writes its
            # final model) instead of being cut at its last report.
            scheduler = ASHAScheduler(time_attr="step", metric="val_loss", mode="min",
                                      grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                                      max_t=s.max_t, stop_last_trials=False)
        tuner = tune.Tuner(
            trainable, param_space=tune_space(config),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name,
                                        num_samples=config.search.num_samples,
                                        max_concurrent_trials=config.resources.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=str(experiment_dir),
                failure_config=tune.FailureConfig(max_failures=config.failures.trial_retries),
                callbacks=wandb_callbacks(config.wandb, config.name, experiment_dir),
                verbose=1),
        )
    results = tuner.fit()
    # A trial ASHA stopped was killed mid-run (its trial.json may say running or error); Tune knows
    # it ended without an error, so record that in the trial directory the outputs are built from.
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        info_path = experiment_dir / TRIALS / str(trial_id) / TRIAL_JSON
        if result.error is None and trial_id and info_path.is_file() \
                and read_json(info_path).get("status") not in (OK, "over budget"):
            write_json_atomic(info_path, {**read_json(info_path), "status": STOPPED, "error": ""})


def _trial_name(trial) -> str:
    return f"rank_{trial.trial_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Search the approximations' ranks with Optuna on Ray Tune.")
    parser.add_argument("--config", required=True, help="rank-search YAML, e.g. configs/rank_search/tiny.yaml")
    parser.add_argument("--from-ablation", help="an ablation's experiment directory: its dense "
                                                "baseline seeds the first points (rank advisor)")
    parser.add_argument("--out-dir", help="experiment directory (default: the config's out_dir)")
    parser.add_argument("--address", help="Ray cluster address (default: local / `ray job submit`'s)")
    parser.add_argument("--worker-logs", action="store_true",
                        help="stream every training worker's output (progress bars) here; by default "
                             "only Tune's progress table is shown (worker logs stay in Ray's session "
                             "logs, errors in each trial's trial.json)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the rank-search config")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.overrides) + ([f"out_dir={args.out_dir}"] if args.out_dir else [])
        config = load_rank_search(args.config, overrides)
        check_space(config)
        points = advisor_points(config, dense_baseline_export(Path(args.from_ablation))) \
            if args.from_ablation else []
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = ("multi-objective (val loss, training FLOPs), no ASHA" if config.multi_objective else
            f"val loss under {config.search.flops_budget:.3e} training FLOPs, ASHA")
    print(f"rank search {config.name!r}: {config.search.num_samples} trials, {mode}; "
          f"{len(points)} advisor-seeded first point(s)", flush=True)
    for point in points:
        print(f"  seed point: {point}")
    experiment_dir = Path(config.out_dir).resolve()
    start = time.time()
    run_search(config, experiment_dir, points=points, address=args.address,
               worker_logs=args.worker_logs)
    rows, best = write_outputs(experiment_dir, config)
    finished = sum(r["status"] == OK for r in rows)
    print(f"\nrank search {config.name!r}: {finished}/{len(rows)} trials finished in "
          f"{time.time() - start:.0f} s; Pareto front:")
    for r in rows:
        if r["pareto"]:
            ranks = ", ".join(f"{k}={r[k]}" for k in config.space)
            print(f"  val loss {r['final_val_loss']:.4f}  FLOPs {r['training_flops']:.3e}  {ranks}")
    for name in ("pareto.csv", "pareto.png", "best.yaml"):
        print(f"  {name:11s} {experiment_dir / name}")
    if best is None:
        print("no finished trial fits; best.yaml not written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run main from the importable module, not from __main__: Ray pickles rank_trial_driver for
    # the trial processes, and classes defined in __main__ would be pickled by value (which the
    # pydantic models here do not survive).
    from tune.rank_search import main as module_main

    sys.exit(module_main())
