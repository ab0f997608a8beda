"""Bad input to the launch side -- the Tune CLIs, tune.report / tune.rank_advisor, cluster.* and the
shell wrappers -- is refused before any Ray instance or remote launch starts: exit status 2, a few
lines, no traceback, naming the key or path and the bad value.

One table; each row builds its bad input in a temporary folder and runs the entry point in-process
(its `main(argv)`) or, for the shell wrappers, as the user would, without --dry-run: the row proves
that the check runs before the launch, because the launch itself cannot happen here (no srun, no
deepspeed hosts), so a missed check shows up as a different error or a hang.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ABLATION = REPO / "configs/ablation/tiny.yaml"
RANK_SEARCH = REPO / "configs/rank_search/tiny.yaml"
EXPERIMENT = REPO / "configs/experiments/tiny.yaml"


def _yaml(tmp: Path, base: Path, edit: Callable[[dict], None], name: str = "bad.yaml") -> str:
    raw = yaml.safe_load(base.read_text())
    if "experiment" in raw:  # relative to the repository, like every shipped config
        raw["experiment"] = str(REPO / raw["experiment"])
    edit(raw)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _text(tmp: Path, text: str, name: str = "bad.yaml") -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def _experiment_dir(tmp: Path, content: str | None) -> str:
    folder = tmp / "exp"
    folder.mkdir()
    if content is not None:
        (folder / "experiment.json").write_text(content)
    return str(folder)


def _final_export(tmp: Path, config: dict | None, weights: bytes) -> str:
    from distributed.export import FORMAT

    final = tmp / "run" / "final"
    final.mkdir(parents=True)
    model = {"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8, "vocab_size": 16}
    (final / "config.json").write_text(json.dumps(config if config is not None
                                                  else {"format": FORMAT, "model": model}))
    (final / "model.safetensors").write_bytes(weights)
    return str(tmp / "run")


def _site(raw: dict, site: str, **fields) -> None:
    raw["sites"][site].update(fields)


@dataclass
class Row:
    id: str
    entry: str                               # module with main(argv), or a script under cluster/
    argv: Callable[[Path], list[str]]        # built in the row's temporary folder
    expect: tuple[str, ...]                  # substrings of the error: key/path and value


ROWS = [
    # --- tune.ablation --------------------------------------------------------------------------
    Row("ablation-missing-file", "tune.ablation", lambda t: ["--config", str(t / "nope.yaml")],
        ("nope.yaml", "does not exist")),
    Row("ablation-bad-yaml", "tune.ablation", lambda t: ["--config", _text(t, "name: [x\n")],
        ("bad.yaml", "not valid YAML")),
    Row("ablation-top-level-list", "tune.ablation", lambda t: ["--config", _text(t, "- a\n- b\n")],
        ("bad.yaml", "mapping", "list")),
    Row("ablation-unknown-key", "tune.ablation",
        lambda t: ["--config", _yaml(t, ABLATION, lambda r: r.update(seedz=[1]))], ("seedz",)),
    Row("ablation-bad-override-value", "tune.ablation",
        lambda t: ["--config", str(ABLATION), "resources.workers_per_trial=0"], ("workers_per_trial",)),
    Row("ablation-unknown-override", "tune.ablation",
        lambda t: ["--config", str(ABLATION), "resourcez.gpus=1"], ("resourcez",)),
    Row("ablation-missing-experiment", "tune.ablation",
        lambda t: ["--config", _yaml(t, ABLATION, lambda r: r.update(experiment=str(t / "gone.yaml")))],
        ("gone.yaml", "does not exist")),
    Row("ablation-bad-variant-override", "tune.ablation",
        lambda t: ["--config", str(ABLATION), "overrides=[train.max_stepz=5]"], ("max_stepz",)),
    # --- tune.rank_search -----------------------------------------------------------------------
    Row("rank-search-bad-yaml", "tune.rank_search", lambda t: ["--config", _text(t, "space: {a: 1\n")],
        ("bad.yaml", "not valid YAML")),
    Row("rank-search-unknown-key", "tune.rank_search",
        lambda t: ["--config", _yaml(t, RANK_SEARCH, lambda r: r.update(serach={}))], ("serach",)),
    Row("rank-search-low-zero", "tune.rank_search",
        lambda t: ["--config", _yaml(t, RANK_SEARCH, lambda r: _site(r, "mlp_fc", low=0))],
        ("sites.mlp_fc.low", "0")),
    Row("rank-search-grid-above-break-even", "tune.rank_search",
        lambda t: ["--config", _yaml(t, RANK_SEARCH, lambda r: _site(r, "mlp_fc", ranks=[4, 200]))],
        ("sites.mlp_fc", "200", "break-even 103")),
    Row("rank-search-rank-zero", "tune.rank_search",
        lambda t: ["--config", _yaml(t, RANK_SEARCH, lambda r: _site(r, "mlp_fc", ranks=[0, 8]))],
        ("sites.mlp_fc.ranks", "0")),
    Row("rank-search-missing-ablation", "tune.rank_search",
        lambda t: ["--config", str(RANK_SEARCH), "--from-ablation", str(t / "no-ablation")],
        ("no-ablation",)),
    # --- tune.report ----------------------------------------------------------------------------
    Row("report-not-an-experiment", "tune.report", lambda t: [_experiment_dir(t, None)],
        ("exp", "no experiment.json")),
    Row("report-garbage-json", "tune.report", lambda t: [_experiment_dir(t, "\x00\x01 not json")],
        ("experiment.json", "not valid JSON")),
    Row("report-truncated-json", "tune.report",
        lambda t: [_experiment_dir(t, '{"name": "x", "trials": [{"trial_name": "a"')],
        ("experiment.json", "not valid JSON")),
    Row("report-partial-record", "tune.report", lambda t: [_experiment_dir(t, '{"name": "x"}')],
        ("experiment.json", "missing", "trials")),
    Row("report-json-list", "tune.report", lambda t: [_experiment_dir(t, "[1, 2]")],
        ("experiment.json", "JSON object", "list")),
    Row("report-garbage-trial", "tune.report", lambda t: [_experiment_dir(t, json.dumps(
        {"name": "x", "experiment": "e", "seeds": [1], "axes": {}, "free_axes": [], "fixed_axes": {},
         "variants": [], "trials": ["junk"]}))], ("trials[0]", "'junk'")),
    # --- tune.rank_advisor ----------------------------------------------------------------------
    Row("advisor-garbage-safetensors", "tune.rank_advisor",
        lambda t: [_final_export(t, None, os.urandom(64))], ("model.safetensors", "does not hold the model")),
    Row("advisor-empty-safetensors", "tune.rank_advisor",
        lambda t: [_final_export(t, None, b"")], ("model.safetensors", "does not hold the model")),
    Row("advisor-not-an-export", "tune.rank_advisor",
        lambda t: [_final_export(t, {"format": "other"}, b"")], ("config.json", "'other'")),
    Row("advisor-missing-path", "tune.rank_advisor", lambda t: [str(t / "nothing")],
        ("nothing", "no final model")),
    Row("advisor-share-out-of-range", "tune.rank_advisor", lambda t: [str(t), "--share", "1.5"],
        ("--share", "1.5")),
    # --- cluster.* ------------------------------------------------------------------------------
    Row("estimate-write-missing-folder", "cluster.estimate",
        lambda t: ["--config", str(ABLATION), "--write", str(t / "missing" / "cost.md")],
        ("--write", "missing", "does not exist")),
    Row("estimate-bad-mfu", "cluster.estimate", lambda t: ["--config", str(ABLATION), "--mfu", "0"],
        ("--mfu",)),
    Row("submit-env-not-a-name", "cluster.submit",
        lambda t: ["ablation", "--address", "http://h:8265", "--config", str(ABLATION),
                   "--env", "WANDB API KEY=abc", "--dry-run"], ("'WANDB API KEY'", "not a variable name")),
    Row("validate-bad-override-value", "cluster.validate",
        lambda t: ["experiment", str(EXPERIMENT), "train.max_steps=abc"], ("max_steps", "abc")),
    # --- shell wrappers: the check runs before the fan-out ----------------------------------------
    Row("deepspeed-sh-unknown-key", "deepspeed_train.sh",
        lambda t: ["--hostfile", _text(t, "node-a slots=8\nnode-b slots=8\n", "hostfile"),
                   "--config", _yaml(t, EXPERIMENT, lambda r: r["train"].update(max_stepz=5))],
        ("max_stepz",)),
    Row("deepspeed-sh-bad-override", "deepspeed_train.sh",
        lambda t: ["--hostfile", _text(t, "node-a slots=8\n", "hostfile"), "--config", str(EXPERIMENT),
                   "deepspeed.zero_stage=7"], ("zero_stage", "7")),
    Row("sbatch-bad-ablation", "slurm_ray.sbatch",
        lambda t: ["--gpus-per-node", "8", "--config", _yaml(t, ABLATION, lambda r: r.update(seedz=[1]))],
        ("seedz",)),
    Row("sbatch-rank-search-above-break-even", "slurm_ray.sbatch",
        lambda t: ["--gpus-per-node", "8", "--job", "rank-search", "--config", _yaml(
            t, RANK_SEARCH, lambda r: _site(r, "mlp_fc", ranks=[4, 200]))],
        ("sites.mlp_fc", "break-even 103")),
]


def _run(row: Row, tmp_path: Path, capsys) -> tuple[int, str]:
    argv = row.argv(tmp_path)
    if row.entry.endswith((".sh", ".sbatch")):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_"))}
        env.update(SLURM_JOB_NODELIST="gpu-a,gpu-b", PYTHONPATH=str(REPO))
        done = subprocess.run(["bash", str(REPO / "cluster" / row.entry), *argv], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)
        # nothing was launched: no `ray start`, no deepspeed runner
        assert "ray start" not in done.stdout and "deepspeed.launcher" not in done.stdout + done.stderr
        return done.returncode, done.stderr
    import importlib

    main = importlib.import_module(row.entry).main
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input_is_refused_before_launch(row, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    import ray

    code, err = _run(row, tmp_path, capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4, err
    for piece in row.expect:
        assert piece in err, f"{piece!r} not in: {err}"
    assert not ray.is_initialized()


def test_the_table_is_large_enough():
    assert len(ROWS) >= 20 and len({r.id for r in ROWS}) == len(ROWS)
