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

import sys
import time
from pathlib import Path

import numpy as np

from distributed.config import ConfigError
from tune import report
from tune.analysis import unigram_entropy
from tune.driver import RAY_TRAIN_DIR, TrialSpec, fingerprint, parser, run_grid, start_ray
from tune.driver import overrides as cli_overrides
from tune.grid import (Grid, describe, expand, experiment_config, experiment_record, load_ablation,
                       validate_grid)
from tune.results import EXPERIMENT_JSON, OK, RESULTS_CSV, TRIALS, collect, read_json, \
    write_json_atomic
from tune.trainable import TRAIN_FN
from tune.wandb_logging import wandb_callbacks

TUNE_DIR = "tune"        # Ray Tune's experiment state, under the experiment directory


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


def trial_specs(grid: Grid, experiment_dir: Path, train_fn: str) -> list[TrialSpec]:
    """One spec per trial: everything the trial needs, resolved and validated here."""
    c = grid.config
    out = []
    for trial in grid.trials():
        run_dir = experiment_dir / TRIALS / trial.trial_name
        out.append(TrialSpec(
            trial_name=trial.trial_name,
            experiment=experiment_config(c, trial, run_dir).model_dump(mode="json"),
            run_dir=str(run_dir), ray_storage=str(experiment_dir / RAY_TRAIN_DIR),
            resources=c.resources.model_dump(), worker_restarts=c.failures.worker_restarts,
            train_fn=train_fn,
            record={"variant": trial.variant.name, "seed": trial.seed, "axes": trial.variant.axes,
                    "baseline": trial.variant.baseline}))
    return out


def run_ablation(grid: Grid, experiment_dir: Path, *, address: str | None = None,
                 train_fn: str = TRAIN_FN, worker_logs: bool = False) -> list[dict]:
    """Run (or resume) every trial of `grid`; return the results rows. Writes the report."""
    experiment_dir = experiment_dir.resolve()
    specs = trial_specs(grid, experiment_dir, train_fn)
    record = experiment_record(grid)
    record["fingerprint"] = fingerprint(specs)
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

    start_ray(address, worker_logs)
    c = grid.config
    run_grid(experiment_dir, TUNE_DIR, specs, max_concurrent=c.resources.max_concurrent_trials,
             trial_retries=c.failures.trial_retries,
             callbacks=wandb_callbacks(c.wandb, c.name, experiment_dir,
                                       {s.trial_name: s.identity() for s in specs}))
    return collect(experiment_dir)


def main(argv: list[str] | None = None) -> int:
    args = parser("Run an ablation grid with Ray Tune and write its report.",
                  "ablation YAML, e.g. configs/ablation/tiny.yaml").parse_args(argv)
    try:
        config = load_ablation(args.config, cli_overrides(args))
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
