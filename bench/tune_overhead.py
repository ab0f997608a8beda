"""Figure 7: Ray Tune overhead: seconds from trial start to the first training step, and trials/hour
on the tiny grid.

Measured through tune's public entry point (`python -m tune.ablation`, which runs each trial as a
Tune function trainable driving Ray Train and distributed/train.py), on a 2-trial mini grid of
configs/ablation/tiny.yaml: the dense baseline and the grown low-rank-MLP variant, 20 steps each at
micro-batch 4, both at once. Times come from the trial's own records: trial.json's `started` (set when
the Tune trainable begins) and the first `train` record's timestamp in the trial's metrics.jsonl.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import not_measured
from bench.setups import Context

TITLE = "Ray Tune overhead: trial start to first step, trials/hour"
TARGET = "report seconds to first step and trials/hour on the tiny grid"
REPO = Path(__file__).resolve().parents[1]
STEPS = 20
# Very few steps on the tiny model, so the figure is the overhead, not the training.
OVERRIDES = [f"overrides=[train.max_steps={STEPS}, train.warmup_steps=2, train.eval_interval=10, "
             "train.micro_batch_size=4, data.val_tokens=4096, train.checkpoint_interval=0, "
             "deepspeed.zero_stage=0, wandb.enabled=false]"]
# Every axis fixed but the low-rank MLP: the dense baseline + one variant, run concurrently.
TWO_TRIALS = ["axes.abba_attn.fixed=false", "axes.compressed_attn.fixed=false", "axes.freeze.fixed=false",
              "axes.lowrank_mlp.fixed=true", "resources.max_concurrent_trials=2", "frontier.budgets=[]"]


def run(ctx: Context) -> dict:
    if ctx.smoke:
        return not_measured(7, TITLE, TARGET, "skipped in smoke mode (starts Ray and two trials)")
    from tune.results import TRIAL_JSON, collect, read_json, read_metrics

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        out = Path(tmp) / "exp"
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "tune.ablation", "--config", "configs/ablation/tiny.yaml",
               "--out-dir", str(out), *OVERRIDES, *TWO_TRIALS]
        started = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        wall = time.time() - started
        if proc.returncode != 0:
            raise RuntimeError(f"tune.ablation failed (rc {proc.returncode}): "
                               + (proc.stdout + proc.stderr)[-2000:])
        trials = []
        for row in collect(out):
            run_dir = out / row["run_dir"]
            info = read_json(run_dir / TRIAL_JSON)
            records = read_metrics(run_dir)
            run_start = min(r["time"] for r in records if r["event"] == "run_start")
            first_step = min(r["time"] for r in records if r["event"] == "train")
            last_step = max(r["time"] for r in records if r["event"] == "train")
            trials.append({"variant": row["variant"], "status": row["status"],
                           "command_to_trial_start_s": info["started"] - started,
                           "trial_start_to_run_start_s": run_start - info["started"],
                           "trial_start_to_first_step_s": first_step - info["started"],
                           "first_to_last_step_s": last_step - first_step,
                           "trial_wall_s": row["wall_time_s"]})

    to_first = [t["trial_start_to_first_step_s"] for t in trials]
    per_hour = len(trials) * 3600 / wall
    serial_per_hour = 3600 / statistics.mean(t["trial_wall_s"] for t in trials)
    summary = (f"{statistics.median(to_first):.1f} s from trial start to first step (median of "
               f"{len(trials)}); {per_hour:.0f} trials/hour end to end ({len(trials)} concurrent "
               f"{STEPS}-step trials in {wall:.0f} s, Ray start included)")
    rows = [[t["variant"], t["status"], f"{t['command_to_trial_start_s']:.1f}",
             f"{t['trial_start_to_run_start_s']:.1f}", f"{t['trial_start_to_first_step_s']:.1f}",
             f"{t['first_to_last_step_s']:.1f}", f"{t['trial_wall_s']:.1f}"] for t in trials]
    return {
        "figure": 7, "title": TITLE, "target": TARGET, "status": "info", "summary": summary,
        "tables": [{"title": f"configs/ablation/tiny.yaml, 2-trial grid, {STEPS} steps, micro-batch 4, "
                             "1 worker x 1 CPU per trial, local Ray on this machine",
                    "columns": ["trial", "status", "command -> trial start s",
                                "trial start -> trainer run_start s", "trial start -> first step s",
                                f"first -> last step s ({STEPS - 1} steps)", "trial wall s"],
                    "rows": rows}],
        "notes": ["Trial start is trial.json's `started` (the Tune trainable began); the first step is "
                  "the first `train` record of the trial's metrics.jsonl. The gap is Ray Train's "
                  "worker group, the process group, the trainer's set-up (token cache open, "
                  "validation batches) and the first engine build.",
                  f"trials/hour counts the whole `python -m tune.ablation` command ({wall:.0f} s: Ray "
                  "start, token-cache check, both trials, the report); one trial alone on a free "
                  f"slot would give {serial_per_hour:.0f}/hour (3600 / mean trial wall). Both are "
                  "dominated by fixed overhead at this step count."],
        "profiles": [],
        "data": {"trials": trials, "command_wall_s": wall, "trials_per_hour": per_hour,
                 "steps_per_trial": STEPS},
    }
