"""wandb for Tune experiments: Ray's wandb callback, one wandb run per trial, grouped by experiment.

Offline unless an API key is configured (WANDB_API_KEY or `wandb login`'s ~/.netrc entry); offline
runs land in `<experiment>/wandb/` and upload later with `wandb sync`.

Two changes to Ray's `WandbLoggerCallback` (Ray 2.60, wandb 0.31), both small:
- Each run's config holds what identifies the trial (an ablation's variant, seed and axes; a rank
  search's sampled ranks are already the trial config), not only the trial's name.
- The logging actor tears wandb down before it returns. `wandb.finish()` hands the run's last records
  to the wandb-core service and returns; Ray kills the actor as soon as `run()` returns, and with it
  wandb-core, so the trial that finished last lost its whole history (seen: its offline run held no
  history record). `wandb.teardown()` waits for the service to write everything out.
"""
from __future__ import annotations

import os
from pathlib import Path

from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

from distributed.metrics import resolve_wandb_mode


class _FlushingWandbLoggingActor(_WandbLoggingActor):
    def run(self):
        try:
            super().run()
        finally:
            self._wandb.teardown()


class TrialWandbCallback(WandbLoggerCallback):
    """`WandbLoggerCallback` whose runs carry `trial_info[trial name]` in their config and are
    written out completely before their logging actor ends."""

    _logger_actor_cls = _FlushingWandbLoggingActor

    def __init__(self, trial_info: dict[str, dict] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._trial_info = trial_info or {}

    def log_trial_start(self, trial) -> None:
        # Ray builds wandb.init's arguments from trial.config, then applies self.kwargs over them.
        info = self._trial_info.get(trial.config.get("trial"), {})
        self.kwargs["config"] = {**trial.config, **info}
        super().log_trial_start(trial)


def wandb_callbacks(spec, group: str, experiment_dir: Path,
                    trial_info: dict[str, dict] | None = None) -> list:
    """[TrialWandbCallback] when `spec.enabled`, else []; `spec` is a config's `wandb` section."""
    if not spec.enabled:
        return []
    mode = resolve_wandb_mode(spec.mode)
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"   # also tells Ray's callback not to look for a key
    (experiment_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return [TrialWandbCallback(trial_info, project=spec.project, group=group, mode=mode,
                               dir=str(experiment_dir / "wandb"))]

