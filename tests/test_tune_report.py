"""The report's math on synthetic results with known effects, and the report rebuilt from files alone."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tune import analysis, report
from tune.grid import expand, experiment_record, load_ablation
from tune.results import (EXPERIMENT_JSON, METRICS, OK, RESULTS_CSV, TRIAL_JSON, TRIALS, collect,
                          read_csv, write_json_atomic)

ROOT = Path(__file__).resolve().parents[1]
AXES = ["abba_attn", "compressed_attn", "lowrank_mlp", "freeze"]
# Known truth: additive effects, one interaction, FLOPs savings.
EFFECT = {"abba_attn": 0.10, "compressed_attn": 0.02, "lowrank_mlp": 0.30, "freeze": -0.05}
INTERACTION = ("abba_attn", "lowrank_mlp", 0.04)   # extra loss when both are on
FLOPS_SAVING = {"abba_attn": 0.2, "compressed_attn": 0.1, "lowrank_mlp": 0.3, "freeze": 0.25}


def true_loss(axes: dict[str, bool]) -> float:
    a, b, extra = INTERACTION
    return 2.0 + sum(EFFECT[x] for x in AXES if axes[x]) + (extra if axes[a] and axes[b] else 0.0)


def true_flops(axes: dict[str, bool]) -> float:
    return 1e12 * math.prod(1 - FLOPS_SAVING[x] for x in AXES if axes.get(x))


def write_experiment(tmp_path: Path, seeds: list[int], noise: float, fail: set[str] = frozenset()) -> Path:
    grid = expand(load_ablation(ROOT / "configs/ablation/tiny.yaml", [f"seeds={seeds}"]))
    record = experiment_record(grid)
    record["val_unigram_entropy"], record["val_tokens"] = 3.2, 32768
    write_json_atomic(tmp_path / EXPERIMENT_JSON, record)
    rng = random.Random(0)
    for trial in record["trials"]:
        run_dir = tmp_path / TRIALS / trial["trial_name"]
        run_dir.mkdir(parents=True)
        baseline = trial["baseline"]
        final = 1.9 if baseline else true_loss(trial["axes"]) + rng.gauss(0, noise)
        flops = 1.6e12 if baseline else true_flops(trial["axes"])
        status = "error" if trial["trial_name"] in fail else OK
        write_json_atomic(run_dir / TRIAL_JSON, {"status": status, "attempts": 1, "wall_time_s": 60.0,
                                                 "error": "boom" if status != OK else ""})
        records, t = [], 0.0
        for step in range(1, 6):
            t += 1
            finish = trial["axes"]["finish"]
            realized = finish and step == 5   # after the finish: the dense model, all trainable
            records.append({"event": "train", "step": step * 10, "time": t, "tokens": step * 1000,
                            "flops": flops * step / 5, "tokens_per_s": 500.0,
                            "params_total": 2e6 if realized else 1e6,
                            "params_trainable": 2e6 if realized else 5e5 + step,
                            "peak_memory_bytes": 1e8, "loss": 3.0})
            val = final + 0.5 * (5 - step) + (0.03 if finish and step == 4 else 0.0)
            # the stage that ends at step 40 is the last approximated one; the finish realizes
            # the model right after it (an eval with when="realized"), then trains to step 50
            when = "stage_end" if step == 4 else "interval"
            records.append({"event": "eval", "step": step * 10, "time": t + 0.1, "when": when,
                            "val_loss": val, "tokens": step * 1000,
                            "flops": flops * step / 5})
            if finish and step == 4:
                records.append({"event": "eval", "step": 40, "time": t + 0.2, "when": "realized",
                                "val_loss": val + 0.2, "tokens": 4000, "flops": flops * 4 / 5})
        if status != OK:
            records = records[:2]
        if baseline:  # a crashed first attempt logged step 50 too; the resumed attempt's record wins
            records.insert(0, {"event": "eval", "step": 50, "time": 0.0, "when": "interval",
                               "val_loss": 9.9, "tokens": 5000, "flops": flops})
        # a torn last line (writer killed mid-write) must be tolerated
        text = "\n".join(json.dumps(r) for r in records) + "\n{\"step\": 6"
        (run_dir / METRICS).write_text(text)
    return tmp_path


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def stats_of(tmp_path: Path) -> list[analysis.VariantStats]:
    spec = json.loads((tmp_path / EXPERIMENT_JSON).read_text())
    return analysis.variant_stats(collect(tmp_path), list(spec["axes"]))


def test_main_effects_interactions_and_leave_one_out_recover_the_truth(tmp_path):
    stats = stats_of(write_experiment(tmp_path, seeds=[0], noise=0.0))
    noise = analysis.noise_sigma(stats, AXES)
    main = {e.name: e for e in analysis.main_effects(stats, AXES, noise)}
    a, b, extra = INTERACTION
    for axis in AXES:
        # the interaction adds extra/2 to the main effect of each of its two axes
        expected = EFFECT[axis] + (extra / 2 if axis in (a, b) else 0.0)
        assert main[axis].d_loss == pytest.approx(expected, abs=1e-9)
        assert main[axis].d_flops_rel == pytest.approx(-FLOPS_SAVING[axis], rel=1e-9)
    pairs = {e.name: e for e in analysis.interactions(stats, AXES, noise)}
    assert pairs[f"{a} x {b}"].d_loss == pytest.approx(extra / 2, abs=1e-9)
    assert all(e.d_loss == pytest.approx(0.0, abs=1e-9) for n, e in pairs.items() if n != f"{a} x {b}")
    top, loo = analysis.leave_one_out(stats, AXES, noise)
    assert top == "grow+abba+compressed+lrmlp+freeze+finish"
    loo = {e.name: e for e in loo}
    assert loo["lowrank_mlp"].d_loss == pytest.approx(EFFECT["lowrank_mlp"] + extra, abs=1e-9)
    assert loo["compressed_attn"].d_loss == pytest.approx(EFFECT["compressed_attn"], abs=1e-9)
    # no noise at all: the high-order interactions are exactly zero, nothing is "within noise"
    assert noise.sigma == pytest.approx(0.0, abs=1e-9)


def test_noise_from_seeds_flags_small_effects(tmp_path):
    stats = stats_of(write_experiment(tmp_path, seeds=[0, 1, 2], noise=0.15))
    noise = analysis.noise_sigma(stats, AXES)
    assert "seeds" in noise.source and 0.1 < noise.sigma < 0.2
    main = {e.name: e for e in analysis.main_effects(stats, AXES, noise)}
    assert main["lowrank_mlp"].within_noise is False   # 0.3 >> noise
    assert main["compressed_attn"].within_noise is True       # 0.02 << 2 SE (~0.09)
    by_name = {s.name: s for s in stats}
    assert all(s.n == 3 and s.loss_std > 0 for s in by_name.values() if not s.baseline)


def test_one_seed_noise_comes_from_high_order_interactions(tmp_path):
    stats = stats_of(write_experiment(tmp_path, seeds=[0], noise=0.05))
    noise = analysis.noise_sigma(stats, AXES)
    assert "3+ axes" in noise.source and 0.005 < noise.sigma < 0.2


def test_pareto_front():
    points = [(1.0, 3.0), (2.0, 2.0), (3.0, 2.5), (4.0, 1.0), (2.0, 2.2), (0.5, 5.0)]
    assert analysis.pareto_front(points) == [5, 0, 1, 3]
    # property: no point beats a front point on both objectives; every non-front point is beaten
    rng = np.random.default_rng(0)
    pts = [tuple(p) for p in rng.random((60, 2))]
    front = set(analysis.pareto_front(pts))
    for i, (f, l) in enumerate(pts):
        dominated = any(g <= f and m <= l and (g, m) != (f, l) for g, m in pts)
        assert (i in front) == (not dominated)


def test_unigram_entropy():
    assert analysis.unigram_entropy(np.array([3, 3, 3])) == pytest.approx(0.0)
    assert analysis.unigram_entropy(np.arange(256).repeat(4)) == pytest.approx(math.log(256))


def test_report_rebuilds_from_logged_files_alone(tmp_path, capsys):
    failed = "grow+abba+finish_s0"
    exp = write_experiment(tmp_path, seeds=[0], noise=0.01, fail={failed})
    assert report.main([str(exp)]) == 0
    printed = capsys.readouterr().out
    for name in ("results.csv", "report.md", "pareto.png", "effects.png", "curves.png"):
        assert (exp / name).is_file() and (exp / name).stat().st_size > 0
    rows = read_csv(exp / RESULTS_CSV)
    assert len(rows) == 17
    by_trial = {f"{r['variant']}_s{r['seed']}": r for r in rows}
    assert by_trial[failed]["status"] == "error"
    full = by_trial["grow+abba+compressed+lrmlp+freeze+finish_s0"]
    assert full["axes"] == {"layerwise": True, "abba_attn": True, "compressed_attn": True,
                            "lowrank_mlp": True, "freeze": True, "finish": True}
    # before-finish loss is the last eval before the model was realized
    assert full["val_loss_before_finish"] == pytest.approx(full["final_val_loss"] + 0.5 + 0.03)
    # parameter counts are the approximated model's, not the dense one the finish trains
    assert full["peak_trainable_params"] == 5e5 + 4 and full["total_params"] == 1e6
    assert full["training_flops"] == pytest.approx(true_flops(full["axes"]))
    dense = by_trial["dense_s0"]
    assert dense["val_loss_before_finish"] == dense["final_val_loss"] == pytest.approx(1.9)
    text = (exp / "report.md").read_text()
    assert "3.2000 nats/token" in text and "Dense baseline val loss: **1.9000**" in text
    assert "40.6% below" in text and "meets" in text
    assert "Leave-one-out" in text and "Two-way interactions" in text and failed in text
    # ranked table: dense (1.9) first, failed variant absent from the ranking
    table = [line for line in printed.splitlines() if line.startswith("| 1 |")]
    assert table and "dense" in table[0]
    assert "| grow+abba+finish |" not in printed
