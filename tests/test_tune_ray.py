"""The ablation on real Ray: Tune trials running Ray Train + the trainer, fault tolerance (a killed
worker, SIGTERM to one rank, a killed driver), resume, and the cluster path (`ray start --head` +
`python -m cluster.submit`, Ray's job API) with the wandb callback.

Both tests use a micro model and a ~20-step budget: they check the plumbing, not the numbers.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tune.results import evaluations, read_csv, read_json, read_metrics
from wandb_records import read_offline_run

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RAY = str(Path(PYTHON).with_name("ray"))

# A micro experiment: 2 blocks of width 32, 20 steps, a checkpoint every 4 steps, the loss synced
# (and a stop acted on) at every step, so the fault tests can name exact steps.
MICRO = ["overrides=[model.n_layer=2, model.n_embd=32, model.n_head=2, model.block_size=32, "
         "train.micro_batch_size=4, train.max_steps=20, train.warmup_steps=2, train.log_interval=1, "
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
    # the NaN of step 3 is seen at the next host sync (train.log_interval), which names its window
    error = rows["dense"]["error"]
    window = re.search(r"non-finite training loss \(nan\) in steps? (\d+)(?:\.\.(\d+))?", error)
    assert rows["dense"]["status"] == "error" and window, error
    assert int(window[1]) <= 3 <= int(window[2] or window[1]), error
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
    """`ray start --head` on 127.0.0.1, `python -m cluster.submit ablation` (Ray's job API, the
    repository as working dir) of a 2-trial ablation with wandb on (offline: no key), results and
    wandb runs checked, cluster stopped (by its own process group, leaving other Ray instances be)."""
    env = _env(tmp_path)
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(key, None)
    env["HOME"] = str(tmp_path)  # no ~/.netrc wandb login either
    # Token authentication, as Ray >= 2.59 enables for local clusters: a token of our own, given to
    # the head and to the client through the environment (never ~/.ray).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), env["PATH"]])   # the job's `python`
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
        # cluster.submit, as a user runs it: the job API uploads the repository, the job runs
        # `python -m tune.ablation` there, its logs are followed to the end. An --env secret
        # travels in the request only: no line of what the command printed holds it.
        secret = f"s3cret-{uuid.uuid4().hex}"
        submit = subprocess.run(
            [PYTHON, "-m", "cluster.submit", "ablation", "--address", address,
             "--config", "configs/ablation/tiny.yaml", "--shared-dir", str(tmp_path),
             "--out-dir", str(out), "--env", f"APPROXGPT_TEST_SECRET={secret}",
             *MICRO, *TWO_TRIALS, LOWRANK_MLP + "]", "seeds=[7]", "wandb.enabled=true"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "SUCCEEDED" in log and "ablation 'ablation-tiny': 2/2 trials finished" in log
        assert secret not in log
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


# One trial (every axis off: the grid is the dense baseline alone) on two Ray Train workers.
ONE_TRIAL_TWO_RANKS = [f"axes.{axis}.fixed=false" for axis in
                       ("layerwise", "abba_attn", "compressed_attn", "lowrank_mlp", "freeze", "finish")] \
    + ["resources.workers_per_trial=2", "resources.max_concurrent_trials=1", "frontier.budgets=[]"]


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass   # the line being written
    return out


def _wait_for(what: str, condition, driver: subprocess.Popen, timeout: float = 400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        assert driver.poll() is None, f"the driver ended before {what}: {driver.communicate()[0][-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _tag(step: int) -> str:
    return f"step{step:07d}"   # distributed/checkpoint.py's checkpoint names


def _train_worker_pids(marker: str) -> list[int]:
    """Ray Train workers of this test's Ray instance (their environment holds `marker`), by pid."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker") \
                    and marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return sorted(pids)


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_and_a_killed_driver_resumes(tmp_path):
    """Preemption under Ray: SIGTERM to one of a trial's two Train workers stops both ranks after the
    same step with a checkpoint, and the restarted worker group resumes from exactly that step; then
    the Tune driver is SIGKILLed mid-trial, and re-running the command resumes the trial from its
    newest checkpoint instead of starting over."""
    out = tmp_path / "exp"
    env = _env(tmp_path)
    # steps slowed to 0.3 s, so that the driver is surely killed before the trial's 20 steps are done
    slow = [MICRO[0].replace("wandb.enabled=false]", "wandb.enabled=false, debug.step_delay_s=0.3]")]
    cmd = [PYTHON, "-m", "tune.ablation", "--config", "configs/ablation/tiny.yaml", "--out-dir", str(out),
           *slow, *ONE_TRIAL_TWO_RANKS]
    run_dir = out / "trials" / "dense_s1337"
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        _wait_for("step 6", lambda: any(r["event"] == "train" and r["step"] >= 6 for r in _records(run_dir)),
                  driver)
        workers = _train_worker_pids(env["APPROXGPT_CACHE"])
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGTERM)
        stopped = _wait_for("the stop", lambda: [r for r in _records(run_dir) if r["event"] == "stopped"],
                            driver)[0]
        # Rank 0 (which got no signal) logged the stop: the two ranks agreed on the step.
        assert stopped["step"] >= 7 and Path(stopped["checkpoint"]).name == _tag(stopped["step"]), stopped
        restarted = _wait_for("the restarted workers", lambda: [
            r for r in _records(run_dir) if r["event"] == "run_start" and r["attempt"] == 1], driver)[0]
        assert restarted["resumed_from"] == Path(stopped["checkpoint"]).name
        _wait_for("a step after the restart", lambda: any(
            r["event"] == "train" and r["attempt"] == 1 and r["step"] > stopped["step"] + 1
            for r in _records(run_dir)), driver)
        os.kill(driver.pid, signal.SIGKILL)   # the Tune driver, mid-trial
        driver.wait(timeout=60)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)   # whatever is left of the Ray instance it started
        except ProcessLookupError:
            pass
        driver.wait(timeout=60)
    first = [r for r in _records(run_dir) if r["event"] == "train" and r["attempt"] == 1]
    assert min(r["step"] for r in first) == stopped["step"] + 1
    killed_at = max(r["step"] for r in first)
    assert killed_at < 20, "the trial finished before the driver was killed"

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert "resuming the experiment" in rerun.stdout
    records = _records(run_dir)
    starts = [r for r in records if r["event"] == "run_start"]
    resumed = starts[-1]
    assert resumed["attempt"] == 2
    # A checkpoint of this trial, not a fresh start: the stop's or a later one (every 4 steps). Not
    # pinned to the step the driver died at: Ray's workers outlive the killed driver for a moment
    # and may log (and checkpoint) a few more steps before the rerun's Ray instance starts.
    resumed_step = int(resumed["resumed_from"].removeprefix("step"))
    assert resumed_step == stopped["step"] or resumed_step % 4 == 0
    assert stopped["step"] <= resumed_step < 20
    second = [r for r in records if r["event"] == "train" and r["attempt"] == 2]
    assert min(r["step"] for r in second) == resumed_step + 1 and max(r["step"] for r in second) == 20
    row, = read_csv(out / "results.csv")
    assert row["status"] == "ok" and row["final_val_loss"] > 0
