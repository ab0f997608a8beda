"""cluster/submit.py and its shell wrappers: everything the user got wrong is reported before anything
is sent to a cluster; a correct call produces the `ray job submit` command the README documents."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import submit

REPO = Path(__file__).resolve().parents[1]
ABLATION = "configs/ablation/tiny.yaml"


@pytest.fixture(autouse=True)
def no_ambient_cluster(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO)


def submitted(capsys, *argv) -> list[str]:
    """Run a --dry-run submission; return the printed `ray job submit` command as argv."""
    assert submit.main([*argv, "--dry-run"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("submit:"))
    return shlex.split(line.removeprefix("submit:"))


def runtime_env(cmd: list[str]) -> dict:
    return json.loads(cmd[cmd.index("--runtime-env-json") + 1])


def test_missing_address_is_an_error_before_submitting(capsys):
    assert submit.main(["ablation", "--config", ABLATION]) == 2
    err = capsys.readouterr()
    assert "no cluster address" in err.err and "submit:" not in err.out


def test_missing_or_absent_config_is_an_error(capsys):
    assert submit.main(["ablation", "--address", "http://head:8265"]) == 2
    assert "--config is required" in capsys.readouterr().err
    assert submit.main(["ablation", "--address", "http://head:8265", "--config", "configs/ablation/nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_invalid_config_is_reported_with_the_jobs_own_validation(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / ABLATION).read_text().replace("max_concurrent_trials", "max_concurent_trials"))
    assert submit.main(["ablation", "--address", "http://head:8265", "--config", str(bad), "--dry-run"]) == 2
    assert "max_concurent_trials" in capsys.readouterr().err


def test_gcs_port_is_rejected_with_a_hint(capsys):
    assert submit.main(["ablation", "--address", "10.0.0.1:6379", "--config", ABLATION]) == 2
    assert "8265" in capsys.readouterr().err


def test_address_falls_back_to_ray_address(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    cmd = submitted(capsys, "ablation", "--config", ABLATION)
    assert cmd[cmd.index("--address") + 1] == "http://from-env:8265"


def test_submission_runs_the_ablation_from_the_repository_on_shared_storage(capsys):
    cmd = submitted(capsys, "ablation", "--address", "http://head:8265", "--config", ABLATION,
                    "--shared-dir", "/nfs", "seeds=[1,2]")
    assert cmd[:3] == ["ray", "job", "submit"] and "--no-wait" in cmd
    entry = cmd[cmd.index("--") + 1:]
    assert entry == ["python", "-m", "tune.ablation", "--config", ABLATION,
                     "--out-dir", "/nfs/runs/ablation-tiny", "seeds=[1,2]"]
    env = runtime_env(cmd)
    assert env["working_dir"] == str(REPO)
    assert {".venv", "runs"} <= set(env["excludes"])
    assert env["env_vars"]["APPROXGPT_CACHE"] == "/nfs/cache"
    assert env["env_vars"]["NCCL_DEBUG"]  # cluster/nccl.env reaches every worker


def test_local_nccl_settings_win_over_the_file(monkeypatch, capsys):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ens5")
    cmd = submitted(capsys, "ablation", "--address", "http://head:8265", "--config", ABLATION)
    assert runtime_env(cmd)["env_vars"]["NCCL_SOCKET_IFNAME"] == "ens5"


def test_relative_out_dir_is_rejected(capsys):
    assert submit.main(["ablation", "--address", "http://h:8265", "--config", ABLATION,
                        "--out-dir", "runs/x", "--dry-run"]) == 2
    assert "absolute" in capsys.readouterr().err


def test_token_file_turns_on_token_mode_for_the_client(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    env = submit.token_environment(str(token))
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)
    with pytest.raises(submit.SubmitError, match="does not exist"):
        submit.token_environment(str(tmp_path / "missing"))


def test_a_token_in_the_environment_without_the_mode_is_still_sent(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert submit.token_environment(None)["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")   # an explicit choice is respected
    assert submit.token_environment(None)["RAY_AUTH_MODE"] == "disabled"


def test_fetch_commands(capsys):
    assert submit.main(["fetch", "--config", ABLATION, "--cluster-config", "cluster/ray-aws.yaml",
                        "--dry-run"]) == 0
    line = capsys.readouterr().out.split("fetch:", 1)[1]
    assert shlex.split(line) == ["ray", "rsync-down", "cluster/ray-aws.yaml",
                                 "/mnt/shared/runs/ablation-tiny/", "runs/ablation-tiny/"]
    assert submit.main(["fetch", "--remote-dir", "/nfs/runs/x", "--head", "me@head",
                        "--exclude", "checkpoints/", "--dry-run"]) == 0
    cmd = shlex.split(capsys.readouterr().out.split("fetch:", 1)[1])
    assert cmd[0] == "rsync" and "--exclude=checkpoints/" in cmd and cmd[-2:] == ["me@head:/nfs/runs/x/", "runs/x/"]
    assert submit.main(["fetch", "--remote-dir", "/nfs/runs/x", "--dry-run"]) == 2
    assert "--cluster-config" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["submit_ablation.sh", "submit_rank_search.sh"])
def test_shell_wrappers_need_address_and_config(script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(["bash", str(REPO / "cluster" / script)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "usage:" in done.stderr
    done = subprocess.run(["bash", str(REPO / "cluster" / script), "", "configs/x.yaml"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "no cluster address" in done.stderr


def test_ablation_wrapper_submits_from_any_directory(tmp_path):
    done = subprocess.run(["bash", str(REPO / "cluster" / "submit_ablation.sh"), "http://head:8265",
                           str(REPO / ABLATION), "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "-m tune.ablation --config configs/ablation/tiny.yaml" in done.stdout


def test_rank_search_submission_validates_its_base_experiment(capsys, tmp_path):
    cmd = submitted(capsys, "rank-search", "--address", "http://head:8265", "--config",
                    "configs/rank_search/gpt2-124m.yaml", "--from-ablation", "/mnt/shared/runs/a")
    entry = cmd[cmd.index("--") + 1:]
    assert entry[:3] == ["python", "-m", "tune.rank_search"]
    assert entry[entry.index("--from-ablation") + 1] == "/mnt/shared/runs/a"
    assert entry[entry.index("--out-dir") + 1] == "/mnt/shared/runs/rank-search-gpt2-124m"
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/rank_search/gpt2-124m.yaml").read_text()
                   .replace("train.max_steps=5000", "train.max_step=5000"))
    assert submit.main(["rank-search", "--address", "http://h:8265", "--config", str(bad), "--dry-run"]) == 2
    assert "max_step" in capsys.readouterr().err


def test_env_secrets_are_never_printed_logged_or_put_on_a_command_line(monkeypatch, capsys, caplog):
    """`--env KEY=VALUE` and `--env KEY` (forwarded): the value reaches the runtime env but no printed
    line, no log record and no command line of a process this command starts -- through the dry
    run and through a real submission attempt (to a port where nothing listens)."""
    import logging
    import uuid

    inline, forwarded = f"s3cret-{uuid.uuid4().hex}", f"f0rward-{uuid.uuid4().hex}"
    monkeypatch.setenv("MY_FORWARDED_KEY", forwarded)
    started: list[str] = []
    real_popen = subprocess.Popen.__init__

    def record(self, args, *a, **kw):
        started.append(args if isinstance(args, str) else " ".join(map(str, args)))
        real_popen(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", record)
    caplog.set_level(logging.DEBUG)
    argv = ["ablation", "--address", "http://127.0.0.1:9", "--config", ABLATION,
            "--env", f"WANDB_API_KEY={inline}", "--env", "MY_FORWARDED_KEY"]
    cmd = submitted(capsys, *argv)
    env_vars = runtime_env(cmd)["env_vars"]
    assert env_vars["WANDB_API_KEY"] == env_vars["MY_FORWARDED_KEY"] == submit.HIDDEN
    assert submit.build_submission(submit.parser().parse_args(argv)).runtime_env["env_vars"][
        "WANDB_API_KEY"] == inline   # what the job API receives
    assert submit.main(argv) == 2       # nothing listens on port 9
    out = capsys.readouterr()
    assert "cannot reach the Ray job server" in out.err
    everything = "\n".join([out.out, out.err, caplog.text, *started])
    assert inline not in everything and forwarded not in everything
