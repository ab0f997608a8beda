"""Run an ablation grid with Ray Tune, then write its report.

    python -m tune.ablation --config configs/ablation/tiny.yaml [key=value ...]

runs on a local Ray instance (started here when none is running) or, unchanged, on a cluster:

    ray job submit --working-dir . -- python -m tune.ablation --config configs/ablation/cpu-small.yaml \\
        --out-dir /shared/runs/ablation-cpu-small

Trailing `key=value` arguments override keys of the ablation config itself (`seeds=[1,2,3]`,
`resources.max_concurrent_trials=4`, `overrides=[train.max_steps=100]`).

Re-running the same command resumes: finished trials are kept, interrupted and errored ones are
started again and resume from their run directory's newest checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from distributed.config import ConfigError
from tune import report
from tune.analysis import unigram_entropy
from tune.grid import (Grid, describe, expand, experiment_config, experiment_record, load_ablation,
                       validate_grid)
from tune.results import EXPERIMENT_JSON, OK, RESULTS_CSV, TRIALS, collect, read_json, \
    write_json_atomic
from tune.trainable import DRIVER_RESOURCES, TRAIN_ENV, TRAIN_FN, trial_driver
from tune.wandb_logging import wandb_callbacks

TUNE_DIR = "tune"        # Ray Tune's experiment state, under the experiment directory
RAY_TRAIN_DIR = "ray_train"


def validation_token_stats(grid: Grid, experiment_dir: Path) -> dict:
    """Build the token cache once, here on the driver, before any trial starts (trials then find it
    complete and only memory-map it), and measure the validation tokens' unigram entropy: the loss of
    a model that learned token frequencies and nothing else."""
    from data import build_token_cache, validation_batches

    cfg = experiment_config(grid.config, grid.trials()[0], experiment_dir)
    cache = build_token_cache(cfg.data)
    batches = validation_batches(cache.val, batch_size=1024, block_size=cfg.model.block_size,
                                 num_tokens=cfg.data.val_tokens)
    targets = np.concatenate([y.numpy().ravel() for _, y in batches])
    return {"val_unigram_entropy": unigram_entropy(targets), "val_tokens": int(targets.size),
            "token_cache": str(cache.folder)}


def trial_configs(grid: Grid, experiment_dir: Path, train_fn: str) -> list[dict]:
    """One Tune config per trial: everything the trial needs, resolved and validated here."""
    c = grid.config
    resources = c.resources.model_dump()
    out = []
    for trial in grid.trials():
        run_dir = experiment_dir / TRIALS / trial.trial_name
        cfg = experiment_config(c, trial, run_dir)
        out.append({
            "trial": {"trial_name": trial.trial_name, "variant": trial.variant.name,
                      "seed": trial.seed, "axes": trial.variant.axes,
                      "baseline": trial.variant.baseline},
            "experiment": cfg.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "ray_storage": str(experiment_dir / RAY_TRAIN_DIR),
            "resources": resources,
            "worker_restarts": c.failures.worker_restarts,
            "train_fn": train_fn,
        })
    return out


def fingerprint(configs: list[dict]) -> str:
    """Identifies what the trials run, so a changed config never silently resumes an old experiment."""
    what = [(c["trial"]["trial_name"], c["experiment"]) for c in configs]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_ablation(grid: Grid, experiment_dir: Path, *, address: str | None = None,
                 train_fn: str = TRAIN_FN, worker_logs: bool = False) -> list[dict]:
    """Run (or resume) every trial of `grid`; return the results rows. Writes the report."""
    import ray
    from ray import tune

    experiment_dir = experiment_dir.resolve()
    configs = trial_configs(grid, experiment_dir, train_fn)
    record = experiment_record(grid)
    record["fingerprint"] = fingerprint(configs)
    existing = experiment_dir / EXPERIMENT_JSON
    if existing.is_file() and read_json(existing).get("fingerprint") != record["fingerprint"]:
        raise ConfigError(f"{experiment_dir} holds an experiment with a different grid or base config; "
                          "use another out_dir (or --out-dir) or delete it to start over")
    experiment_dir.mkdir(parents=True, exist_ok=True)
    if existing.is_file():
        record.update({k: v for k, v in read_json(existing).items() if k.startswith("val_")
                       or k == "token_cache"})
    else:
        print("building the token cache and measuring the validation tokens ...", flush=True)
        record.update(validation_token_stats(grid, experiment_dir))
    write_json_atomic(existing, record)

    os.environ.update(TRAIN_ENV)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=worker_logs)
    resources = grid.config.resources
    by_name = {c["trial"]["trial_name"]: c for c in configs}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, trial_configs=by_name),
                                    DRIVER_RESOURCES)
    tune_dir = experiment_dir / TUNE_DIR
    if tune.Tuner.can_restore(str(tune_dir)):
        print(f"resuming the experiment in {tune_dir}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(by_name))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=resources.max_concurrent_trials,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=str(experiment_dir),
                failure_config=tune.FailureConfig(max_failures=grid.config.failures.trial_retries),
                callbacks=wandb_callbacks(grid.config.wandb, grid.config.name, experiment_dir,
                                          {name: c["trial"] for name, c in by_name.items()}),
                verbose=1),
        )
    tuner.fit()
    return collect(experiment_dir)


def _trial_name(trial) -> str:
    return trial.config["trial"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an ablation grid with Ray Tune and write its report.")
    parser.add_argument("--config", required=True, help="ablation YAML, e.g. configs/ablation/tiny.yaml")
    parser.add_argument("--out-dir", help="experiment directory (default: the config's out_dir)")
    parser.add_argument("--address", help="Ray cluster address (default: the one `ray job submit` "
                                          "set, else a new local instance)")
    parser.add_argument("--worker-logs", action="store_true",
                        help="stream every training worker's output (progress bars) here; by default "
                             "only Tune's progress table is shown (worker logs stay in Ray's session "
                             "logs, errors in each trial's trial.json)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the ablation config")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.overrides) + ([f"out_dir={args.out_dir}"] if args.out_dir else [])
        config = load_ablation(args.config, overrides)
        grid = expand(config)
        validate_grid(grid)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(grid), flush=True)
    experiment_dir = Path(config.out_dir).resolve()
    start = time.time()
    try:
        rows = run_ablation(grid, experiment_dir, address=args.address,
                            worker_logs=args.worker_logs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = report.build(experiment_dir)
    failed = [r for r in rows if r["status"] != OK]
    print(f"\n{table}\n")
    print(f"ablation {config.name!r}: {len(rows) - len(failed)}/{len(rows)} trials finished in "
          f"{time.time() - start:.0f} s")
    for name in ("report.md", report.REPORT_JSON, RESULTS_CSV, "pareto.png", "effects.png", "curves.png"):
        print(f"  {name:12s} {experiment_dir / name}")
    print(f"  {'trials':12s} {experiment_dir / TRIALS}/<variant>_s<seed>/ (metrics.jsonl, checkpoints)")
    if failed:
        print(f"{len(failed)} trial(s) have no result: "
              + ", ".join(f"{r['variant']}_s{r['seed']} ({r['status']})" for r in failed)
              + "; re-run the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
