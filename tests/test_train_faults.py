"""Preemption, damage and divergence, in one process: SIGTERM checkpoints and exits cleanly; the
newest checkpoint is then damaged (a truncated optimizer shard) and a kill during a later checkpoint
write is faked (a half-written tag, no marker); the resume falls back to the older intact checkpoint
with a warning, and when it hits a non-finite loss it stops naming the steps and stage and keeps the
last good checkpoint. Losses reach the host every train.log_interval = 3 steps only.

The first run goes through `run()` inside a process group its caller created (as Ray Train does)
with a report callback; the resume goes through the command line."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, trainer_env
from distributed import checkpoint as ckpt
from distributed.metrics import read_metrics

pytestmark = pytest.mark.slow

# Long enough that SIGTERM lands mid-run; the same for the run and its resume (configs must match).
OVERRIDES = ["train.max_steps=300", "deepspeed.zero_stage=2", "train.log_interval=3"]

CALLER = """
import json, os, sys
import torch.distributed as dist
from distributed.config import load_config
from distributed.train import run

config, run_dir, port = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=0, world_size=1)   # the caller owns the group, like Ray Train
group = dist.group.WORLD

def report(metrics, checkpoint_dir):
    with open(os.path.join(run_dir, "reports.jsonl"), "a") as f:
        f.write(json.dumps({"step": metrics["step"], "when": metrics["when"],
                            "val_loss": metrics["val_loss"], "checkpoint_dir": checkpoint_dir}) + "\\n")

result = run(load_config(config, sys.argv[4:]), run_dir=run_dir, report=report)
assert dist.is_initialized() and dist.group.WORLD is group
print("RESULT", json.dumps({"step": result.step, "preempted": result.preempted,
                            "completed": result.completed}))
"""


def first_attempt(run_dir, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event and r["attempt"] == 0]


@pytest.fixture(scope="module")
def preempted_then_diverged(tiny_trainer_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CALLER, str(tiny_trainer_config), str(run_dir),
                             str(free_port()), *OVERRIDES],
                            cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in read_metrics(run_dir, "train")] \
            if (run_dir / "metrics.jsonl").is_file() else []
        if steps and max(steps) >= 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stopped = read_metrics(run_dir, "stopped")
    stop_step = stopped[-1]["step"] if stopped else None
    latest_at_stop = ckpt.latest_checkpoint(run_dir)  # before the resume prunes it
    root = ckpt.checkpoint_root(run_dir)
    older = [tag for _, tag in ckpt.complete_tags(root)][-2]
    # Damage the newest complete checkpoint: cut its optimizer shard in half.
    (shard,) = (root / latest_at_stop[0]).glob("*optim_states.pt")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # A kill during a later checkpoint write: files of a newer tag, half-written, and no marker.
    crashed = root / ckpt.tag_for_step(stop_step + 1)
    shutil.copytree(root / older, crashed)
    (crashed / ckpt.META_FILE).unlink()
    for f in crashed.glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    (run_dir / "config.yaml").unlink()  # the checkpoints alone know the config
    nan_step = (stop_step or 0) + 6
    resume = subprocess.run(
        [sys.executable, "-m", "distributed.train", "--config", str(tiny_trainer_config), "--run-dir",
         str(run_dir), "--resume", *OVERRIDES, f"debug.nan_at_step={nan_step}"],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=180)
    refused = subprocess.run(  # a different config, with config.yaml gone: the checkpoint refuses it
        [sys.executable, "-m", "distributed.train", "--config", str(tiny_trainer_config), "--run-dir",
         str(run_dir), *OVERRIDES, "train.learning_rate=0.01"],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=180)
    return run_dir, proc.returncode, out, err, stop_step, latest_at_stop, nan_step, (resume, older, refused)


def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(preempted_then_diverged):
    run_dir, returncode, out, err, stop_step, latest_at_stop, _, _ = preempted_then_diverged
    assert returncode == 0, err[-4000:]
    result = json.loads(out.split("RESULT", 1)[1])
    assert result == {"step": stop_step, "preempted": True, "completed": False}
    assert 6 <= stop_step < 300
    tag, meta = latest_at_stop
    assert tag == ckpt.tag_for_step(stop_step) and meta["step"] == stop_step
    assert not (run_dir / "final").exists()


def test_report_callback_gets_every_evaluation_and_its_checkpoint(preempted_then_diverged):
    run_dir, _, _, _, stop_step, _, _, _ = preempted_then_diverged
    reports = [json.loads(line) for line in (run_dir / "reports.jsonl").read_text().splitlines()]
    evals = first_attempt(run_dir, "eval")  # (the resume repeats some, from an older checkpoint)
    assert [(r["step"], r["when"], r["val_loss"]) for r in reports] == \
        [(r["step"], r["when"], r["val_loss"]) for r in evals]
    # eval_interval 5, checkpoint_interval 4: step 20 has both, step 5 only an evaluation.
    by_step = {r["step"]: r for r in reports}
    assert by_step[5]["checkpoint_dir"] is None
    if stop_step >= 20:
        assert by_step[20]["checkpoint_dir"].endswith(ckpt.tag_for_step(20))


def test_resume_falls_back_past_a_damaged_checkpoint_and_a_crashed_write(preempted_then_diverged):
    run_dir, _, _, _, stop_step, latest_at_stop, _, (resume, older, refused) = preempted_then_diverged
    assert f"checkpoint {latest_at_stop[0]} is damaged" in resume.stderr, resume.stderr[-4000:]
    assert "optim_states.pt has" in resume.stderr and "Traceback" not in resume.stderr
    starts = read_metrics(run_dir, "run_start")
    assert starts[-1]["resumed_from"] == older
    assert (run_dir / "config.yaml").is_file()  # written again for people to read
    # The refused resume: one line naming the key, nothing trained.
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "different config" in refused.stderr and "train.learning_rate: 0.003 -> 0.01" in refused.stderr
    assert len(read_metrics(run_dir, "run_start")) == len(starts)


def test_train_records_come_every_log_interval_and_at_checkpoints(preempted_then_diverged):
    run_dir = preempted_then_diverged[0]
    records = first_attempt(run_dir, "train")
    # A sync at every multiple of 3 (log), 4 (checkpoint) or 5 (evaluation), and at the stop.
    syncs = [s for s in range(1, records[-1]["step"] + 1) if s % 3 == 0 or s % 4 == 0 or s % 5 == 0]
    assert [r["step"] for r in records][: len(syncs)] == syncs
    steps = [0] + [r["step"] for r in records]
    assert [r["steps_averaged"] for r in records] == [b - a for a, b in zip(steps, steps[1:])]


def test_non_finite_loss_stops_naming_step_and_stage_and_keeps_the_good_checkpoint(preempted_then_diverged):
    run_dir, _, _, _, stop_step, _, nan_step, (resume, older, _) = preempted_then_diverged
    assert resume.returncode == 3, resume.stderr[-4000:]
    assert "non-finite training loss" in resume.stderr and "stage 0" in resume.stderr
    window = re.search(r"in steps? (\d+)(?:\.\.(\d+))?, stage", resume.stderr)
    first, last = int(window[1]), int(window[2] or window[1])
    assert first <= nan_step <= last and last - first < 5  # the window of steps that held it
    trained = [r["step"] for r in read_metrics(run_dir, "train")]
    assert max(trained) < nan_step  # no record (and no checkpoint) holds the diverged step
    older_step = int(older.removeprefix("step"))
    tag, meta = ckpt.latest_checkpoint(run_dir, verify=True)
    good = max(s for s in range(older_step, nan_step) if s % 4 == 0 or s == older_step)
    assert meta["step"] == good and tag == ckpt.tag_for_step(good)
    assert all(step < nan_step for step, _ in ckpt.complete_tags(ckpt.checkpoint_root(run_dir)))
