"""One Tune trial = one Ray Train run of the training loop.

Ray 2.60 runs Ray Train V2, where a `TorchTrainer` can no longer be handed to `tune.Tuner`. Instead
each trial is a Tune *function* trainable (`trial_driver`) that builds a `TorchTrainer` and calls
`fit()`; the trainer's reports reach Tune through `TuneReportCallback`, so Tune's progress table,
schedulers (ASHA) and searchers (Optuna) see every evaluation.

    Tune trial actor (trial_driver)           -- a little memory, no CPU: workers hold the CPUs
      -> Train controller actor
           -> N Train workers (_train_worker)  -- DeepSpeed ranks, each calls distributed.train.run

Fault tolerance has two layers. A worker that dies mid-trial makes the Train controller restart the
worker group (Train `FailureConfig`); the trainer then resumes from the newest checkpoint in the
trial's run directory, which is stable per trial (`<experiment>/trials/<variant>_s<seed>`). A trial
that still errors is re-run by Tune (Tune `FailureConfig`), again resuming from that directory.
The trainer's own checkpoints are the only ones: they are not copied into Ray's storage, so the run
directory must be on storage every node can reach (any path on one machine; a shared file system on
a cluster).
"""
from __future__ import annotations

import importlib
import math
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tune.results import ERROR, OK, RUNNING, TRIAL_JSON, read_json, read_metrics, \
    summarize_metrics, write_json_atomic

if TYPE_CHECKING:
    from tune.driver import TrialSpec

TRAIN_FN = "distributed.train:run"

# Train V2 workers block in ray.train.report until the controller's next poll (2 s by default);
# the trainer reports at every evaluation, so a shorter poll keeps that wait negligible. Train
# propagates these variables from the process that builds the TorchTrainer to its workers.
TRAIN_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}

# What the Tune trial actor itself asks for: no CPU (the Train workers hold those, so `cpus_per_worker`
# x `workers_per_trial` x `max_concurrent_trials` can fill a machine), just memory for its process.
DRIVER_RESOURCES = {"memory": 256 * 2**20}


def load_train_fn(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _scalar_metrics(metrics: dict) -> dict:
    """Tune and wandb take numbers and short strings; drop anything else the trainer logs."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or isinstance(value, (int, str)):
            out[key] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[key] = value
    return out


def _train_worker(config: dict) -> None:
    """Runs on every Ray Train worker: one DeepSpeed rank of the training loop."""
    import ray.train

    from distributed.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate(config["experiment"])

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        # Every rank reports (Train V2 requires the same number of reports from each worker);
        # Train forwards rank 0's metrics to Tune.
        metrics = _scalar_metrics(metrics)
        if "flops" in metrics:  # the name the searcher's objective and the results table use
            metrics["training_flops"] = metrics["flops"]
        if checkpoint_dir is not None:
            metrics["checkpoint_dir"] = str(checkpoint_dir)
        ray.train.report(metrics)

    train_fn = load_train_fn(config["train_fn"])
    result = train_fn(cfg, run_dir=config["run_dir"], resume="auto", report=report)
    if getattr(result, "completed", True) is False:
        # Preempted (SIGTERM) after a checkpoint: fail the attempt so Ray retries it, and the retry
        # resumes from that checkpoint, instead of recording an unfinished run as done.
        raise RuntimeError(f"training stopped at step {result.step} before the end of its plan")


def _backend(resources: dict) -> str:
    if resources["backend"] != "auto":
        return resources["backend"]
    return "nccl" if resources["gpus_per_worker"] > 0 else "gloo"


def _update_trial_json(run_dir: Path, **fields: Any) -> dict:
    path = run_dir / TRIAL_JSON
    info = read_json(path) if path.is_file() else {}
    info.update(fields)
    write_json_atomic(path, info)
    return info


def trial_driver(config: dict, trial_configs: dict[str, TrialSpec]) -> None:
    """The Tune function trainable of a fixed list of trials (tune.driver.run_grid). Tune's search
    space holds only the trial names (so the progress table shows them); the specs travel once, via
    tune.with_parameters."""
    run_trial(trial_configs[config["trial"]])


def run_trial(spec: TrialSpec) -> None:
    """Run one trial inside a Tune function trainable. `spec` holds the trial's identity, its full
    validated experiment config, run directory and resources, so nothing here reads YAML files."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.update(TRAIN_ENV)
    trial, resources = spec.identity(), spec.resources
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_json(run_dir / TRIAL_JSON) if (run_dir / TRIAL_JSON).is_file() else {}
    attempts = previous.get("attempts", 0) + 1
    spent = previous.get("wall_time_s") or 0.0
    _update_trial_json(run_dir, **trial, status=RUNNING, attempts=attempts, error="",
                       started=time.time())

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"experiment": spec.experiment, "run_dir": str(run_dir),
                           "train_fn": spec.train_fn},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources["workers_per_trial"],
            use_gpu=resources["gpus_per_worker"] > 0,
            resources_per_worker={"CPU": resources["cpus_per_worker"],
                                  "GPU": resources["gpus_per_worker"]}),
        torch_config=TorchConfig(backend=_backend(resources)),
        run_config=ray.train.RunConfig(
            name=f"{trial['trial_name']}-attempt{attempts}",
            storage_path=str(Path(spec.ray_storage)),
            failure_config=ray.train.FailureConfig(max_failures=spec.worker_restarts),
            # Train's INFO log repeats every report; Tune's progress table already shows them.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[TuneReportCallback()]),
    )
    start = time.time()
    try:
        trainer.fit()
    except BaseException as exc:
        _update_trial_json(run_dir, status=ERROR, wall_time_s=spent + time.time() - start,
                           error="".join(traceback.format_exception_only(exc)).strip()
                           + "\n" + traceback.format_exc()[-4000:])
        raise  # Tune counts the failure and retries the trial up to its FailureConfig
    _update_trial_json(run_dir, status=OK, wall_time_s=spent + time.time() - start, error="")
    _wait_for_forwarded_reports()
    # One last report with the trial's headline numbers (from the trainer's metrics file), so
    # Tune's result -- what the searcher and the progress table see -- is the finished run.
    summary = {k: v for k, v in summarize_metrics(read_metrics(run_dir)).items() if v is not None}
    ray.tune.report({**summary, "val_loss": summary.get("final_val_loss", math.nan), "done": True})


def _wait_for_forwarded_reports(timeout_s: float = 120.0) -> None:
    """Work around a race in Ray 2.60's Tune function trainable: TuneReportCallback hands Train's
    reports to the trial's main thread through a one-slot queue, and the main thread forwards each
    into the one-slot result queue that this (function) thread also reports into. If fit() returns
    while Train's last report still waits in the first queue, our next report (or the function's
    implicit final one when it returns) fills the result queue first and both threads block
    forever -- seen when Tune's loop is slow, e.g. with the wandb callback. So: wait until both
    queues have stayed empty for a moment before reporting or returning."""
    from ray.train._internal.session import get_session

    session = get_session()
    forwarded = getattr(session, "_inter_actor_queue", None)
    if session is None or forwarded is None:
        return
    deadline = time.time() + timeout_s
    quiet_since = None
    while time.time() < deadline:
        if forwarded.empty() and session.result_queue.empty():
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since > 1.0:
                return
        else:
            quiet_since = None
        time.sleep(0.1)
