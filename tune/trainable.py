"""One Tune trial = one Ray Train run of the training loop.

Ray 2.60 runs Ray Train V2, where a `TorchTrainer` can no longer be handed to `tune.Tuner`. Instead
each trial is a Tune *function* trainable (`trial_driver`) that builds a `TorchTrainer` and runs
`fit()` in a thread, while the function's own thread forwards every evaluation the trainer writes to
`metrics.jsonl` to Tune (`ray.tune.report`), so Tune's progress table, schedulers (ASHA) and
searchers (Optuna) see every evaluation. One thread does all of a trial's reports: Ray's
`TuneReportCallback` reports from a second thread into the same one-slot queue, which can deadlock
when `fit()` returns (Ray 2.60), and working around that needed Ray's private session internals.

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

Preemption. The trainer stops after the current step with a checkpoint when its `stop_event` is set;
its own SIGTERM handler cannot work here (Train V2 runs the training function in a worker thread, and
Python runs signal handlers on the main thread only), and Ray's handler on the worker's main thread
exits at once, after which Train kills the other ranks before any checkpoint. Two hooks set the
event instead:
- SIGTERM to a worker process (Slurm's scancel and preemption, `kill`): a `StopOnSigterm` travels in
  the training function's config; Ray unpickles that config on the worker actor's main thread
  (RayTrainWorker.run_train_fn) before starting the function's thread, and unpickling installs our
  handler there. The handler sets the event (a second SIGTERM exits at once, through Ray's handler).
  If Ray ever unpickles elsewhere, `_train_worker` finds no handler and says so on every worker.
- a node drain (spot reclaim, `ray start`'s own SIGTERM on Kubernetes):
  `ray.train.get_preemption_info()`, asked at every evaluation (on every rank, as it requires).
The other ranks learn of the stop in the loop's next all-reduce, so every rank stops after the same
step and writes its part of the checkpoint. The stopped attempt then fails, and the retry (Train's
worker-group restart, else Tune's retry) resumes from that checkpoint.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tune.results import ERROR, METRICS, OK, RUNNING, TRIAL_JSON, read_json, read_metrics, \
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

# How often the trial's thread looks for new evaluations in metrics.jsonl.
FORWARD_POLL_S = 0.5


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


def tune_metrics(record: dict) -> dict:
    """An evaluation record of the trainer as Tune and wandb see it."""
    metrics = _scalar_metrics(record)
    if "flops" in metrics:  # the name the searcher's objective and the results table use
        metrics["training_flops"] = metrics["flops"]
    return metrics


class StopOnSigterm:
    """Pickled into the training function's config; unpickled on a Train worker's main thread, it
    makes SIGTERM set `event` instead of ending the process (see the module docstring)."""

    def __init__(self):
        self.event: threading.Event | None = None
        self.installed = False

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.event = threading.Event()
        self.installed = False
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            self.event.set()
            signal.signal(signal.SIGTERM, previous)   # a second SIGTERM: Ray's handler, exit now

        signal.signal(signal.SIGTERM, on_sigterm)
        self.installed = True


def _train_worker(config: dict) -> None:
    """Runs on every Ray Train worker: one DeepSpeed rank of the training loop."""
    import ray.train

    from distributed.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate(config["experiment"])
    sigterm: StopOnSigterm = config["stop_on_sigterm"]
    stop = sigterm.event or threading.Event()
    if not sigterm.installed:
        print(f"warning: rank {ray.train.get_context().get_world_rank()}: no SIGTERM handler (Ray "
              "no longer unpickles the training config on the worker's main thread); SIGTERM will "
              "end this worker without a checkpoint", file=sys.stderr, flush=True)

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        # Called on every rank after each evaluation: the same number of calls everywhere, which
        # get_preemption_info (a barrier across the workers) requires.
        if ray.train.get_preemption_info() is not None:
            stop.set()

    train_fn = load_train_fn(config["train_fn"])
    result = train_fn(cfg, run_dir=config["run_dir"], resume="auto", report=report, stop_event=stop)
    if getattr(result, "completed", True) is False:
        # Preempted after a checkpoint: fail the attempt so Ray retries it, and the retry resumes
        # from that checkpoint, instead of recording an unfinished run as done.
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
                           "train_fn": spec.train_fn, "stop_on_sigterm": StopOnSigterm()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources["workers_per_trial"],
            use_gpu=resources["gpus_per_worker"] > 0,
            resources_per_worker={"CPU": resources["cpus_per_worker"],
                                  "GPU": resources["gpus_per_worker"]}),
        torch_config=TorchConfig(backend=_backend(resources)),
        run_config=ray.train.RunConfig(
            name=f"{trial['trial_name']}-attempt{attempts}",
            storage_path=str(Path(spec.ray_storage)),
            # A preempted node (drained) does not use up max_failures: Train counts it apart.
            failure_config=ray.train.FailureConfig(max_failures=spec.worker_restarts),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    start = time.time()
    try:
        _fit_forwarding_evaluations(trainer, run_dir)
    except BaseException as exc:
        _update_trial_json(run_dir, status=ERROR, wall_time_s=spent + time.time() - start,
                           error="".join(traceback.format_exception_only(exc)).strip()
                           + "\n" + traceback.format_exc()[-4000:])
        raise  # Tune counts the failure and retries the trial up to its FailureConfig
    _update_trial_json(run_dir, status=OK, wall_time_s=spent + time.time() - start, error="")
    # One last report with the trial's headline numbers (from the trainer's metrics file), so
    # Tune's result -- what the searcher and the progress table see -- is the finished run.
    summary = {k: v for k, v in summarize_metrics(read_metrics(run_dir)).items() if v is not None}
    ray.tune.report({**summary, "val_loss": summary.get("final_val_loss", math.nan), "done": True})


def _fit_forwarding_evaluations(trainer, run_dir: Path) -> None:
    """trainer.fit() in a thread; meanwhile report each evaluation the trainer appends to
    metrics.jsonl to Tune, from this (the function trainable's) thread. Raises what fit() raised."""
    import ray.tune

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the trial's thread, which re-raises it
            failure.append(exc)

    path = run_dir / METRICS
    offset = path.stat().st_size if path.is_file() else 0   # earlier attempts are not reported again
    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    while True:
        finished = not thread.is_alive()  # read before the file: nothing written after is missed
        offset, records = _new_records(path, offset)
        for record in records:
            if record.get("event") == "eval":
                ray.tune.report(tune_metrics(record))
        if finished:
            break
        thread.join(FORWARD_POLL_S)
    if failure:
        raise failure[0]


def _new_records(path: Path, offset: int) -> tuple[int, list[dict]]:
    """The complete JSON lines of `path` after byte `offset`, and the offset after them."""
    if not path.is_file():
        return offset, []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1   # a line still being written waits for the next poll
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue   # a torn line of a killed writer
    return offset + end, records
