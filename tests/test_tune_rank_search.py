"""The rank search: config, seed points from the rank advisor, the choice of best.yaml, and (slow) a
real two-trial Optuna search on Ray whose best.yaml then trains as-is."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distributed.config import ConfigError, load_config
from distributed.export import save_final
from model import GPT
from tune import rank_search
from tune.results import EXPERIMENT_JSON, OK, TRIAL_JSON, TRIALS, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/rank_search/tiny.yaml"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("path", [TINY, ROOT / "configs/rank_search/gpt2-124m.yaml"])
def test_shipped_configs_validate_at_both_corners_of_the_space(path):
    config = rank_search.load_rank_search(path)
    rank_search.check_space(config)
    assert config.multi_objective


def test_bad_bounds_fail_before_ray_starts():
    with pytest.raises(ConfigError, match="rank"):
        rank_search.check_space(rank_search.load_rank_search(
            TINY, ["space={approx.mlp_fc.rank: {type: int, low: 4, high: 100000}}"]))
    with pytest.raises(ConfigError, match="low <= high"):
        rank_search.load_rank_search(TINY, ["space={approx.mlp_fc.rank: {type: int, low: 9, high: 4}}"])
    with pytest.raises(ConfigError, match="two objectives"):
        rank_search.load_rank_search(TINY, ["search.objectives={val_loss: min}"])
    single = rank_search.load_rank_search(TINY, ["search.objectives={val_loss: min}",
                                                 "search.flops_budget=1e12"])
    assert not single.multi_objective


def _fake_ablation(tmp_path: Path) -> Path:
    """An ablation directory whose dense baseline export has a rank-3 MLP input weight everywhere."""
    cfg = load_config(ROOT / "configs/experiments/tiny.yaml", ["approx={}", "model.n_layer=2"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for block in model.transformer.h:
            w = block.mlp.c_fc.weight
            w.copy_(torch.randn(w.shape[0], 3) @ torch.randn(3, w.shape[1]))
    run_dir = tmp_path / TRIALS / "dense_s1"
    save_final(model, run_dir / "final", encoding_name="byte")
    write_json_atomic(tmp_path / EXPERIMENT_JSON, {"trials": [
        {"trial_name": "dense_s1", "variant": "dense", "seed": 1, "axes": {}, "baseline": True}]})
    return tmp_path


def test_advisor_seeds_the_first_points_inside_the_space(tmp_path):
    config = rank_search.load_rank_search(TINY)
    points = rank_search.advisor_points(config, rank_search.dense_baseline_export(_fake_ablation(tmp_path)))
    assert 1 <= len(points) <= 3
    for point in points:
        assert set(point) == set(config.space)
        for key, value in point.items():
            spec = config.space[key]
            assert spec.low <= value <= spec.high and isinstance(value, int)
        # the rank-3 weight needs at most rank 3; the space's floor is 4
        assert point["approx.mlp_fc.rank"] == config.space["approx.mlp_fc.rank"].low
        # the compressed attention's slots are not a weight's rank: the base experiment's value
        assert point["approx.attention.slots"] == 2
    with pytest.raises(ConfigError, match="dense baseline"):
        empty = tmp_path / "empty"
        write_json_atomic(empty / EXPERIMENT_JSON, {"trials": []})
        rank_search.dense_baseline_export(empty)


def test_choose_best_knee_and_budget():
    front = [{"training_flops": f, "final_val_loss": l}
             for f, l in [(1e9, 3.0), (2e9, 2.2), (4e9, 2.1), (8e9, 2.05)]]
    assert rank_search.choose_best(front, None) is front[1]           # the knee
    assert rank_search.choose_best(front, 5e9) is front[2]            # lowest loss under budget
    assert rank_search.choose_best(front, 1e8) is None
    assert rank_search.choose_best([], None) is None


def test_outputs_from_trial_directories(tmp_path):
    config = rank_search.load_rank_search(TINY, [f"out_dir={tmp_path}"])
    trials = {"a": (4, 3.0, 1e9, OK), "b": (16, 2.5, 2e9, OK), "c": (64, 2.6, 4e9, OK),
              "d": (128, 9.0, 1e8, rank_search.STOPPED)}   # cut short by ASHA
    for name, (rank, loss, flops, status) in trials.items():
        run_dir = tmp_path / TRIALS / name
        params = {k: (rank if "mlp" in k else 4) for k in config.space}
        write_json_atomic(run_dir / rank_search.PARAMS_JSON, params)
        write_json_atomic(run_dir / TRIAL_JSON, {"status": status, "wall_time_s": 1.0})
        (run_dir / "metrics.jsonl").write_text(json.dumps(
            {"event": "eval", "step": 10, "time": 1.0, "val_loss": loss, "flops": flops}) + "\n")
    rows, best = rank_search.write_outputs(tmp_path, config)
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial["d"]["status"] == rank_search.STOPPED and not by_trial["d"]["pareto"]
    assert [by_trial[t]["pareto"] for t in "abc"] == [1, 1, 0]   # c is beaten by b on both
    assert best["trial"] in {"a", "b"}
    text = (tmp_path / "best.yaml").read_text()
    raw = yaml.safe_load(text)
    assert "cache_dir" not in raw["data"]
    cfg = load_config(tmp_path / "best.yaml")
    assert cfg.approx.mlp_fc.rank == trials[best["trial"]][0]
    assert cfg.train.max_steps == 300   # the search's shared overrides are in it
    assert (tmp_path / "pareto.csv").read_text().count("\n") == 5 and (tmp_path / "pareto.png").is_file()


@pytest.mark.slow
def test_rank_search_on_ray_then_best_yaml_trains(tmp_path):
    env = dict(os.environ, APPROXGPT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "search"
    micro = ["overrides=[model.n_layer=2, model.n_embd=32, model.n_head=2, model.block_size=32, "
             "train.micro_batch_size=4, train.max_steps=12, train.warmup_steps=2, "
             "train.eval_interval=4, data.val_tokens=1024, deepspeed.zero_stage=0, "
             "wandb.enabled=false, approx.attention.chunk=16, approx.attention.window=8, "
             "approx.attention.allow_costlier=true]",
             "space={approx.mlp_fc.rank: {type: int, low: 2, high: 16, log: true}, "
             "approx.attention.slots: {type: int, low: 2, high: 8}}",
             "search.num_samples=2"]
    result = subprocess.run([sys.executable, "-m", "tune.rank_search", "--config", str(TINY),
                             "--out-dir", str(out), *micro],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    rows = list(csv_rows(out / "pareto.csv"))
    assert len(rows) == 2 and all(r["status"] == OK for r in rows)
    assert any(r["pareto"] == "1" for r in rows)
    assert "Pareto front" in result.stdout
    # best.yaml runs as-is with the trainer (its out_dir is relative: runs/<name>-best)
    run = subprocess.run([sys.executable, "-m", "distributed.train", "--config", str(out / "best.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert (tmp_path / "runs/rank-search-tiny-best/final/model.safetensors").is_file()


def csv_rows(path):
    import csv
    with open(path, newline="") as f:
        yield from csv.DictReader(f)
