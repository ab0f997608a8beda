"""The ablation on real Ray: Tune trials running Ray Train + the trainer, fault tolerance, resume, and
the cluster path (`ray start --head` + `ray job submit --working-dir .`) with Ray's wandb callback.

Both tests use a micro model and a ~20-step budget: they check the plumbing, not the numbers.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster.submit import run_job_submit
from tune.results import evaluations, read_csv, read_json, read_metrics
from wandb_records import read_offline_run

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RAY = str(Path(PYTHON).with_name("ray"))

# A micro experiment: 2 blocks of width 32, 20 steps, a checkpoint every 4 steps.
MICRO = ["overrides=[model.n_layer=2, model.n_embd=32, model.n_head=2, model.block_size=32, "
         "train.micro_batch_size=4, train.max_steps=20, train.warmup_steps=2, "
         "train.eval_interval=4, train.checkpoint_interval=4, data.val_tokens=1024, "
         "deepspeed.zero_stage=0, wandb.enabled=false]"]
# Every axis fixed, low-rank MLP on (with a rank that fits the micro model), no dense frontier: the
# grid is the dense baseline + one variant, two trials at once.
TWO_TRIALS = ["axes.abba_attn.fixed=false", "axes.compressed_attn.fixed=false", "axes.freeze.fixed=false",
              "axes.lowrank_mlp.fixed=true", "resources.max_concurrent_trials=2", "frontier.budgets=[]"]
LOWRANK_MLP = ("axes.lowrank_mlp.when_on=[\"approx.mlp_fc={kind: lowrank, rank: 8}\", "
               "\"approx.mlp_proj={kind: lowrank, rank: 8}\"")


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    # A private token cache (built once by the driver) and the repo importable from any cwd.
    env["APPROXGPT_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _ablation(out_dir: Path, env: dict, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "tune.ablation", "--config", "configs/ablation/tiny.yaml",
           "--out-dir", str(out_dir), *MICRO, *TWO_TRIALS, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ablation_survives_killed_workers_and_failing_variants_and_resumes(tmp_path):
    """A worker SIGKILLed mid-trial restarts from its checkpoint; a variant that fails every time
    does not stop the others; re-running the command keeps finished trials and retries the rest."""
    out = tmp_path / "exp"
    env = _env(tmp_path)
    faults = [
        # the low-rank MLP variant: rank 0 SIGKILLs itself right after step 8's checkpoint
        LOWRANK_MLP + ", debug.kill_at_step=8]",
        # the dense baseline: a NaN loss at step 3 on every attempt
        "baseline_overrides=[debug.nan_at_step=3]",
        "failures.trial_retries=0",
    ]
    first = _ablation(out, env, *faults)
    log = first.stdout + first.stderr
    assert first.returncode == 1, log[-3000:]   # 1: ran to the end, some trial has no result
    rows = {r["variant"]: r for r in read_csv(out / "results.csv")}
    assert set(rows) == {"dense", "grow+lrmlp+finish"}
    assert rows["dense"]["status"] == "error" and "step 3" in rows["dense"]["error"]
    killed = rows["grow+lrmlp+finish"]
    assert killed["status"] == "ok" and killed["final_val_loss"] is not None
    # The kill was absorbed by Ray Train (worker group restart), not by a Tune-level retry ...
    assert killed["attempts"] == 1
    killed_dir = out / killed["run_dir"]
    records = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    # ... and the trainer resumed from step 8 instead of starting over.
    resumed = [r for r in records if r.get("attempt", 0) >= 1 and r["event"] == "train"]
    assert resumed and min(r["step"] for r in resumed) == 9
    assert max(r["step"] for r in records if r["event"] == "train") == 20
    for name in ("report.md", "pareto.png", "effects.png", "curves.png"):
        assert (out / name).is_file()
    assert "Trials without a result" in (out / "report.md").read_text()
    finished_state = (killed_dir / "trial.json").read_text()
    finished_metrics = (killed_dir / "metrics.jsonl").read_text()

    # Re-run the same command: Tune restores the experiment; the finished trials are not run
    # again, the errored one is retried (and fails again: the fault is part of its config).
    second = _ablation(out, env, *faults)
    assert "resuming the experiment" in second.stdout, (second.stdout + second.stderr)[-3000:]
    assert second.returncode == 1
    assert (killed_dir / "trial.json").read_text() == finished_state
    assert (killed_dir / "metrics.jsonl").read_text() == finished_metrics
    assert read_json(out / "trials/dense_s1337/trial.json")["attempts"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_to_a_local_head(tmp_path):
    """`ray start --head` on 127.0.0.1, `ray job submit --working-dir .` of a 2-trial ablation with
    wandb on (offline: no key), results and wandb runs checked, cluster stopped (by its own process
    group, leaving other Ray instances be)."""
    env = _env(tmp_path)
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(key, None)
    env["HOME"] = str(tmp_path)  # no ~/.netrc wandb login either
    # Token authentication, as Ray >= 2.59 enables for local clusters: a token of our own, given to
    # the head and to the client through the environment (never ~/.ray).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"rt{uuid.uuid4().hex[:6]}"   # short: Ray puts sockets in it
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
         # Free ports for the agents too: the defaults (52365, ...) clash with any other Ray instance
         # on the machine, whose agent then serves no jobs of ours ("No available agent").
         "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
         "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    out = tmp_path / "exp"
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 90
        while subprocess.run([RAY, "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, head.stdout.read()
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)
        excludes = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", "wandb"]
        submit = run_job_submit(
            [RAY, "job", "submit", "--address", address, "--working-dir", ".",
             "--runtime-env-json", json.dumps({"excludes": excludes}), "--",
             PYTHON, "-m", "tune.ablation", "--config", "configs/ablation/tiny.yaml",
             "--out-dir", str(out), *MICRO, *TWO_TRIALS, LOWRANK_MLP + "]", "seeds=[7]",
             "wandb.enabled=true"],
            env=env, cwd=ROOT, timeout=240)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "succeeded" in log
        rows = read_csv(out / "results.csv")
        assert {r["variant"] for r in rows} == {"dense", "grow+lrmlp+finish"}
        assert all(r["status"] == "ok" and r["seed"] == 7 and r["final_val_loss"] > 0 for r in rows)
        assert (out / "report.md").is_file()
        summary = json.loads((out / "report.json").read_text())
        assert summary["n_seeds"] == 1 and summary["control"] == "grow+lrmlp+finish"
        final = summary["metrics"]["final"]
        assert final["cells"]["dense"]["loss_mean"] == pytest.approx(
            next(r["final_val_loss"] for r in rows if r["variant"] == "dense"), rel=1e-12)
        # One complete offline wandb run per trial, grouped by experiment, configured with the
        # trial's variant and seed, whose history is every evaluation the trainer logged.
        runs = {r["name"]: r for r in map(read_offline_run, (out / "wandb").rglob("offline-run-*/*.wandb"))}
        assert set(runs) == {Path(r["run_dir"]).name for r in rows}, runs.keys()
        for row in rows:
            run = runs[Path(row["run_dir"]).name]
            assert run["finished"] and run["group"] == "ablation-tiny"
            assert run["config"]["variant"] == row["variant"] and run["config"]["seed"] == 7
            evaluated = [e["val_loss"] for e in evaluations(read_metrics(out / row["run_dir"]))]
            logged = [h["val_loss"] for h in run["history"] if "val_loss" in h]
            assert evaluated and logged[:len(evaluated)] == evaluated
            assert logged[-1] == row["final_val_loss"]
    finally:
        # Stop this head and everything it started: one process group, ours alone.
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
