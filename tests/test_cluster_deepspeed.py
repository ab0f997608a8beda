"""cluster/deepspeed_train.sh: the DeepSpeed multi-node launcher wrapper. Argument handling is checked
with --dry-run (fast); one slow test really launches 2 ranks on CPU from a `localhost slots=2` hostfile,
the path DeepSpeed takes without ssh or pdsh."""
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "deepspeed_train.sh"
TINY = "configs/experiments/tiny.yaml"


def run(*args, cwd=REPO, env=None, timeout=60):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NCCL_")}
    environ.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          env=environ, timeout=timeout)


def dry_run(*args, **kw) -> list[str]:
    done = run("--dry-run", *args, **kw)
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


@pytest.fixture
def localhost2(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one machine, two ranks\nlocalhost slots=2\n")
    return hostfile


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_localhost_hostfile_launches_locally_without_ssh(localhost2):
    cmd = dry_run("--hostfile", str(localhost2), "--config", TINY, "train.max_steps=4")
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert "--no_ssh_check" in cmd and "--launcher" not in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"
    tail = cmd[cmd.index("--module"):]
    assert tail == ["--module", "distributed.train", "--config", str(REPO / TINY), "train.max_steps=4"]


def test_several_hosts_go_through_the_launcher_with_the_first_host_as_master(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    cmd = dry_run("--hostfile", str(hostfile), "--config", TINY, "--launcher", "openmpi",
                  "--master-port", "29600", "--run-dir", "/shared/run", "--resume", "--", "seed=1")
    assert cmd[cmd.index("--launcher") + 1] == "openmpi" and "--no_ssh_check" not in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "node-a"
    assert cmd[cmd.index("--master_port") + 1] == "29600"
    assert cmd[cmd.index("--run-dir") + 1] == "/shared/run" and "--resume" in cmd and cmd[-1] == "seed=1"
    cmd = dry_run("--hostfile", str(hostfile), "--config", TINY, "--node-rank", "1", "--master-addr", "10.0.0.1")
    assert cmd[cmd.index("--node_rank") + 1] == "1" and "--no_ssh" in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"


def test_nccl_settings_are_exported_and_the_callers_win(localhost2, tmp_path):
    probe = tmp_path / "py"
    probe.write_text("#!/bin/sh\nenv | grep '^NCCL_' | sort\n")
    probe.chmod(0o755)
    done = run("--hostfile", str(localhost2), "--config", TINY, "--python", str(probe),
               env={"NCCL_DEBUG": "INFO"})
    assert done.returncode == 0, done.stderr
    assert "NCCL_DEBUG=INFO" in done.stdout and "NCCL_SOCKET_IFNAME=^lo,docker" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--config", TINY], "--hostfile is required"),
    (["--hostfile", "HOSTFILE"], "--config is required"),
    (["--hostfile", "/nonexistent", "--config", TINY], "does not exist"),
    (["--hostfile", "HOSTFILE", "--config", TINY, "notanoverride"], "unknown argument"),
    (["--hostfile", "HOSTFILE", "--config", TINY, "--launcher", "ssh"], "--launcher must be"),
    (["--hostfile", "HOSTFILE", "--config", TINY, "--node-rank", "5"], "out of range"),
    (["--hostfile", "BADHOSTFILE", "--config", TINY], "bad line"),
])
def test_bad_arguments_fail_before_launching(args, message, localhost2, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("node-a 8\n")
    args = [str(localhost2) if a == "HOSTFILE" else str(bad) if a == "BADHOSTFILE" else a for a in args]
    done = run(*args, "--dry-run")
    assert done.returncode == 2 and message in done.stderr and "deepspeed" not in done.stdout


@pytest.mark.slow
def test_two_ranks_train_from_a_localhost_hostfile(localhost2, tmp_path):
    run_dir = tmp_path / "run"
    done = run("--hostfile", str(localhost2), "--config", TINY, "--run-dir", str(run_dir),
               "--master-port", "29731",
               "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
               "approx.attention={kind: compressed, slots: 4, chunk: 8, window: 4, allow_costlier: true}",
               "train.max_steps=4", "train.micro_batch_size=2", "train.warmup_steps=1",
               "train.eval_interval=2", "train.log_interval=1", "data.val_tokens=2048",
               "schedule.rewarmup_steps=0", "deepspeed.zero_stage=2", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [m for m in metrics if m.get("event") == "train"]
    assert max(m["step"] for m in train) == 4
    # DeepSpeed's local launcher started one rank per slot of the hostfile, and the trainer saw both:
    # 4 steps x 2 sequences x 32 tokens x 2 ranks
    assert "dist_world_size=2" in done.stdout + done.stderr
    assert max(m["tokens"] for m in train) == 4 * 2 * 32 * 2
