"""What every Tune program here shares (the ablation, the rank search): the command line, loading a
strict YAML config with dotted overrides, the typed trial spec, and Ray start/attach + fit-or-resume.

    parser = driver.parser("Run an ablation ...", "ablation YAML, e.g. configs/ablation/tiny.yaml")
    args = parser.parse_args(argv)
    config = driver.load_strict(AblationConfig, args.config, driver.overrides(args))
    results = driver.run_grid(experiment_dir, "tune", specs, ...)   # grid of named trials

Overrides are `key=value` strings whose key is a dotted path; a segment in double quotes may hold
dots, so maps keyed by dotted names are reachable:

    'space."approx.mlp_fc.rank".high=64'      (quote the whole argument for the shell)

Re-running a command resumes: `fit_or_resume` restores the Tune experiment under the experiment
directory when one is there (finished trials kept, errored and interrupted ones started again, each
resuming from its run directory's newest checkpoint).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError

from common import format_validation_error
from distributed.config import ConfigError, apply_overrides, read_yaml
from tune.trainable import DRIVER_RESOURCES, TRAIN_ENV, TRAIN_FN

RAY_TRAIN_DIR = "ray_train"   # Ray Train's storage of each trial's attempts, under the experiment dir

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class TrialSpec:
    """Everything one Tune trial needs, resolved and validated on the driver: the trial process reads
    no YAML and shares no working directory with the driver."""

    trial_name: str               # stable across re-runs: the run directory hangs off it
    experiment: dict              # a validated ExperimentConfig, model_dump(mode="json")
    run_dir: str
    ray_storage: str
    resources: dict               # tune.grid.ResourcesSpec, dumped
    worker_restarts: int
    train_fn: str = TRAIN_FN
    # What trial.json and the wandb run record about the trial beside its name (the ablation: variant,
    # seed, axes, baseline; the rank search: site, kind, rank, seed, ...).
    record: dict = field(default_factory=dict)

    def identity(self) -> dict:
        return {"trial_name": self.trial_name, **self.record}


def fingerprint(specs: list[TrialSpec]) -> str:
    """Identifies what a set of trials runs, so a changed config never silently resumes an old one."""
    what = [(s.trial_name, s.experiment) for s in specs]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def parser(description: str, config_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--out-dir", help="experiment directory (default: the config's out_dir)")
    p.add_argument("--address", help="Ray cluster address (default: the one `ray job submit` set, "
                                     "else a new local instance)")
    p.add_argument("--worker-logs", action="store_true",
                   help="stream every training worker's output (progress bars) here; by default only "
                        "Tune's progress table is shown (worker logs stay in Ray's session logs, "
                        "errors in each trial's trial.json)")
    p.add_argument("overrides", nargs="*",
                   help='key=value overrides of this config; quote a segment holding dots: '
                        '\'space."approx.mlp_fc.rank".high=64\'')
    return p


def overrides(args: argparse.Namespace) -> list[str]:
    return list(args.overrides) + ([f"out_dir={args.out_dir}"] if args.out_dir else [])


def load_strict(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Read a YAML file, apply dotted overrides, validate into `model`; one line per problem."""
    raw = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), key_path=quoted_key_path)) from None


def quoted_key_path(loc: tuple) -> str:
    """A pydantic location as the override syntax writes it: segments holding dots in quotes."""
    return ".".join(f'"{p}"' if "." in str(p) else str(p) for p in loc)


def start_ray(address: str | None, worker_logs: bool) -> None:
    """Attach to `address` (or `ray job submit`'s cluster), else start a local instance; once."""
    import ray

    os.environ.update(TRAIN_ENV)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=worker_logs)


def fit_or_resume(experiment_dir: Path, name: str, trainable: Any,
                  make_tuner: Callable[[Any], Any]):
    """Restore the Tune experiment `experiment_dir/name` when there is one, else build it with
    make_tuner(trainable); run it to the end and return Tune's ResultGrid."""
    from ray import tune

    tune_dir = experiment_dir / name
    if tune.Tuner.can_restore(str(tune_dir)):
        print(f"resuming the experiment in {tune_dir}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = make_tuner(trainable)
    return tuner.fit()


def run_grid(experiment_dir: Path, name: str, specs: list[TrialSpec], *, max_concurrent: int,
             trial_retries: int, callbacks: list | None = None) -> Any:
    """Run (or resume) a fixed list of trials, one Tune trial each (Ray must be started). Tune's
    search space is the list of trial names (so its progress table shows them); the specs travel
    once, through tune.with_parameters."""
    from ray import tune

    from tune.trainable import trial_driver

    by_name = {s.trial_name: s for s in specs}
    if len(by_name) != len(specs):
        raise ValueError("trial names must be unique")
    trainable = tune.with_resources(tune.with_parameters(trial_driver, trial_configs=by_name),
                                    DRIVER_RESOURCES)

    def make(trainable):
        return tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(by_name))},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                        trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=name, storage_path=str(experiment_dir),
                                      failure_config=tune.FailureConfig(max_failures=trial_retries),
                                      callbacks=callbacks or [], verbose=1))

    return fit_or_resume(experiment_dir, name, trainable, make)


def _trial_name(trial) -> str:
    return trial.config["trial"]
