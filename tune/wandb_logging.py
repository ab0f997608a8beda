"""wandb for Tune experiments: one wandb run per trial, grouped by experiment.

Offline unless an API key is configured (WANDB_API_KEY or `wandb login`'s ~/.netrc entry); offline
runs land in `<experiment>/wandb/` and upload later with `wandb sync`.

A plain Tune `Callback` (public API) that runs wandb in the Tune driver, one `wandb.Run` per trial
(`reinit="create_new"`). Ray's `WandbLoggerCallback` runs each trial's wandb in an actor built on a
private class (`_WandbLoggingActor`), and that actor lost the last trial's history when Ray killed
it before wandb-core had written it out; here the driver tears wandb down when the experiment ends,
which waits for every run's records.
- Each run's config holds what identifies the trial (an ablation's variant, seed and axes; a rank
  search's sampled ranks are already the trial config), not only the trial's name.
- Each result's numbers are logged, as Ray's callback does (minus Tune's bookkeeping keys).
"""
from __future__ import annotations

import os
from pathlib import Path

from ray.tune import Callback

from distributed.metrics import resolve_wandb_mode

# Tune's per-result bookkeeping, not metrics (Ray's callback files these under the config too).
NOT_LOGGED = {"done", "should_checkpoint", "config", "trial_id", "experiment_tag", "node_ip",
              "experiment_id", "hostname", "pid", "date"}


class TrialWandbCallback(Callback):
    """One wandb run per Tune trial, whose config is the trial's config plus `trial_info[trial name]`."""

    def __init__(self, trial_info: dict[str, dict] | None = None, *, project: str, **kwargs):
        self._trial_info = trial_info or {}
        self.project = project
        self.kwargs = kwargs        # more wandb.init arguments: group, mode, dir
        self._runs: dict[str, object] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        import wandb

        if trial.trial_id in self._runs:   # a retried trial keeps logging into its run
            return
        config = {**trial.config, **self._trial_info.get(trial.config.get("trial"), {})}
        self._runs[trial.trial_id] = wandb.init(
            project=self.project, id=trial.trial_id, name=str(trial), config=config,
            resume="allow", reinit="create_new", **self.kwargs)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run = self._runs.get(trial.trial_id)
        if run is None:
            return
        numbers = {k: v for k, v in result.items()
                   if k not in NOT_LOGGED and isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.log(numbers)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial.trial_id, 0)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial.trial_id, 1)

    def on_experiment_end(self, trials, **info) -> None:
        import wandb

        for trial_id in list(self._runs):
            self._finish(trial_id, 1)   # still open: interrupted
        wandb.teardown()   # waits until wandb-core has written every run out

    def _finish(self, trial_id: str, exit_code: int) -> None:
        run = self._runs.pop(trial_id, None)
        if run is not None:
            run.finish(exit_code=exit_code)

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment (for Tuner.restore); open runs stay here.
        return {**self.__dict__, "_runs": {}}


def wandb_callbacks(spec, group: str, experiment_dir: Path,
                    trial_info: dict[str, dict] | None = None) -> list:
    """[TrialWandbCallback] when `spec.enabled`, else []; `spec` is a config's `wandb` section."""
    if not spec.enabled:
        return []
    mode = resolve_wandb_mode(spec.mode)
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
    (experiment_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return [TrialWandbCallback(trial_info, project=spec.project, group=group, mode=mode,
                               dir=str(experiment_dir / "wandb"))]
