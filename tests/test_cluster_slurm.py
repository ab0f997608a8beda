"""cluster/slurm_ray.sbatch: valid bash, argument checks before any Ray process starts, and (dry run)
one Ray head plus one worker per allocated node with the requested GPUs, then the driver."""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "slurm_ray.sbatch"


def run(*args, nodelist="gpu-a,gpu-b,gpu-c", **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if nodelist:
        environ["SLURM_JOB_NODELIST"] = nodelist
    environ.update(env)
    # No scontrol here: a node list without [ranges] is split on commas.
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ,
                          cwd=REPO)


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_sbatch_header_is_read_by_slurm():
    header = [l for l in SCRIPT.read_text().splitlines() if l.startswith("#SBATCH")]
    assert any("--gpus-per-node" in l for l in header) and any("--requeue" in l for l in header)


def test_dry_run_starts_a_head_and_one_worker_per_node_then_the_driver():
    done = run("--dry-run", "--gpus-per-node", "4", "--config", "configs/ablation/tiny.yaml",
               "--", "seeds=[1,2]")
    assert done.returncode == 0, done.stderr
    lines = [shlex.split(l.rstrip("&").strip()) for l in done.stdout.splitlines()]
    starts = [l for l in lines if "ray" in l and "start" in l]
    assert len(starts) == 3
    head, workers = starts[0], starts[1:]
    assert "--head" in head and head[head.index("-w") + 1] == "gpu-a"
    assert [w[w.index("-w") + 1] for w in workers] == ["gpu-b", "gpu-c"]
    for s in starts:
        assert s[s.index("--num-gpus") + 1] == "4"
    assert all("--address=gpu-a:6379" in w for w in workers)
    driver = lines[-1]
    assert driver[:4] == ["python", "-u", "-m", "tune.ablation"]
    assert driver[driver.index("--address") + 1] == "gpu-a:6379" and driver[-1] == "seeds=[1,2]"


def test_rank_search_job_runs_the_rank_search_module():
    done = run("--dry-run", "--gpus-per-node", "8", "--job", "rank-search", "--config",
               "configs/ablation/tiny.yaml", "--from-ablation", "runs/a")
    assert done.returncode == 0, done.stderr
    driver = shlex.split(done.stdout.splitlines()[-1])
    assert "tune.rank_search" in driver and driver[driver.index("--from-ablation") + 1] == "runs/a"


def test_gpu_count_defaults_to_the_allocations():
    done = run("--dry-run", "--config", "configs/ablation/tiny.yaml", SLURM_GPUS_ON_NODE="2")
    assert done.returncode == 0, done.stderr
    assert "--num-gpus 2" in done.stdout


@pytest.mark.parametrize("args, message", [
    ([], "--config is required"),
    (["--config", "configs/ablation/missing.yaml"], "does not exist"),
    (["--config", "configs/ablation/tiny.yaml", "--gpus-per-node", "eight"], "whole number"),
    (["--config", "configs/ablation/tiny.yaml"], "--gpus-per-node is required"),
    (["--config", "configs/ablation/tiny.yaml", "--gpus-per-node", "8", "--job", "sweep"], "ablation or rank-search"),
    (["--config", "configs/ablation/tiny.yaml", "--gpus-per-node", "8", "--bogus"], "unknown argument"),
    (["--config", "configs/ablation/tiny.yaml", "--gpus-per-node", "8", "--from-ablation", "x"], "rank-search"),
])
def test_bad_arguments_fail_before_anything_starts(args, message):
    done = run("--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr
    assert "ray start" not in done.stdout


def test_outside_an_allocation_it_says_so():
    done = run("--dry-run", "--gpus-per-node", "8", "--config", "configs/ablation/tiny.yaml", nodelist="")
    assert done.returncode == 2 and "not inside a Slurm allocation" in done.stderr


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="scontrol present: ranges expand")
def test_a_bracketed_node_list_needs_scontrol():
    done = run("--dry-run", "--gpus-per-node", "8", "--config", "configs/ablation/tiny.yaml",
               nodelist="gpu[01-04]")
    assert done.returncode == 2 and "scontrol" in done.stderr
