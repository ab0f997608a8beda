"""The report's statistics on synthetic results with a known truth, and the report rebuilt from files
alone: every number in report.json recomputed from results.csv."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tune import analysis, report, stats
from tune.grid import expand, experiment_record, load_ablation
from tune.results import (EXPERIMENT_JSON, METRICS, OK, RESULTS_CSV, TRIAL_JSON, TRIALS, collect,
                          read_csv, write_json_atomic)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/ablation/tiny.yaml"
AXES = ["abba_attn", "compressed_attn", "lowrank_mlp", "freeze"]
# Known truth: every approximation alone hurts (or helps) by EFFECT; two interactions (extra loss
# when both are on). compressed_attn x freeze is twice compressed_attn's own effect and of opposite sign, so
# compressed_attn's main effect (0.02 - 0.08/2) is negative although adding it alone hurts: the case
# the report must flag.
EFFECT = {"abba_attn": 0.10, "compressed_attn": 0.02, "lowrank_mlp": 0.30, "freeze": -0.05}
INTERACTIONS = {("abba_attn", "lowrank_mlp"): 0.04, ("compressed_attn", "freeze"): -0.08}
FLOPS_SAVING = {"abba_attn": 0.2, "compressed_attn": 0.1, "lowrank_mlp": 0.3, "freeze": 0.25}
DENSE_FLOPS = 1.6e12


def true_loss(axes: dict[str, bool]) -> float:
    return (2.0 + sum(EFFECT[x] for x in AXES if axes.get(x))
            + sum(v for (a, b), v in INTERACTIONS.items() if axes.get(a) and axes.get(b)))


def true_main(axis: str) -> float:
    # in a balanced 2^k grid each interaction adds half its size to both of its axes' main effects
    return EFFECT[axis] + sum(v / 2 for pair, v in INTERACTIONS.items() if axis in pair)


def true_flops(axes: dict[str, bool]) -> float:
    return 1e12 * math.prod(1 - FLOPS_SAVING[x] for x in AXES if axes.get(x))


def dense_loss(budget: float) -> float:
    return 1.9 - 0.3 * math.log(budget)    # linear in log FLOPs, as the frontier interpolates


def write_experiment(tmp_path: Path, seeds: list[int], noise: float, fail: set[str] = frozenset(),
                     seed_effect: float = 0.0, overrides: list[str] = ()) -> Path:
    grid = expand(load_ablation(TINY, [f"seeds={seeds}", *overrides]))
    record = experiment_record(grid)
    record["val_unigram_entropy"], record["val_tokens"] = 3.2, 32768
    write_json_atomic(tmp_path / EXPERIMENT_JSON, record)
    rng = random.Random(0)
    offsets = {s: rng.gauss(0, seed_effect) for s in seeds}   # shared by every variant: paired
    for trial in record["trials"]:
        run_dir = tmp_path / TRIALS / trial["trial_name"]
        run_dir.mkdir(parents=True)
        dense = not any(trial["axes"].values())
        budget = trial["budget"]
        final = (dense_loss(budget) if dense else true_loss(trial["axes"])) \
            + offsets[trial["seed"]] + rng.gauss(0, noise)
        flops = DENSE_FLOPS * budget if dense else true_flops(trial["axes"])
        status = "error" if trial["trial_name"] in fail else OK
        write_json_atomic(run_dir / TRIAL_JSON, {"status": status, "attempts": 1, "wall_time_s": 60.0,
                                                 "error": "boom" if status != OK else ""})
        # contract item 2: the trainer's per-block LR budget in the run_start record
        records, t = [{"event": "run_start", "step": 0, "time": 0.0, "blocks": [
            {"index": 0, "steps_trained": 50, "lr_integral": 1.0},
            {"index": 1, "steps_trained": 30, "lr_integral": 0.6 if not dense else 1.0}],
            "dense_lr_integral": 1.0}], 0.0
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
                            "val_loss": val, "tokens": step * 1000, "flops": flops * step / 5})
            if finish and step == 4:
                records.append({"event": "eval", "step": 40, "time": t + 0.2, "when": "realized",
                                "val_loss": val + 0.2, "tokens": 4000, "flops": flops * 4 / 5})
        if status != OK:
            records = records[:3]
        if trial["baseline"]:  # a crashed first attempt logged step 50 too; the resumed attempt's record wins
            records.insert(1, {"event": "eval", "step": 50, "time": 0.0, "when": "interval",
                               "val_loss": 9.9, "tokens": 5000, "flops": flops})
        # a torn last line (writer killed mid-write) must be tolerated
        text = "\n".join(json.dumps(r) for r in records) + "\n{\"step\": 6"
        (run_dir / METRICS).write_text(text)
    return tmp_path


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def analyse_design(exp: Path) -> report.Design:
    return report.design_of(json.loads((exp / EXPERIMENT_JSON).read_text()))


def analyse(exp: Path, metric: str = "final") -> report.MetricResult:
    return report.analyse_metric(collect(exp), analyse_design(exp), metric)


# ------------------------------------------------------------------ the truth is recovered


def test_effects_recover_an_additive_truth_with_interactions(tmp_path):
    result = analyse(write_experiment(tmp_path, seeds=[0, 1], noise=0.0, seed_effect=0.05))
    assert result.layout.sigma == pytest.approx(0.0, abs=1e-9)   # the seed offsets are paired out
    for axis in AXES:
        e = result.effects[axis]
        assert e.simple.estimate == pytest.approx(EFFECT[axis], abs=1e-9)   # at grow+finish
        assert e.main.estimate == pytest.approx(true_main(axis), abs=1e-9)
        for other, (off, on) in e.conditional.items():
            extra = INTERACTIONS.get((axis, other), INTERACTIONS.get((other, axis), 0.0))
            assert on.estimate - off.estimate == pytest.approx(extra, abs=1e-9)
    # compressed_attn: alone it hurts (+0.02), its main effect says the opposite (-0.02): flagged
    assert result.effects["compressed_attn"].main.estimate < 0 < result.effects["compressed_attn"].simple.estimate
    flags = {a: result.effects[a].interaction_dominated for a in AXES}
    assert flags == {"abba_attn": False, "compressed_attn": True, "lowrank_mlp": False, "freeze": False}
    pairs = {k: e.estimate for k, e in result.pairs.items()}
    assert pairs["abba_attn x lowrank_mlp"] == pytest.approx(0.02, abs=1e-9)
    assert pairs["compressed_attn x freeze"] == pytest.approx(-0.04, abs=1e-9)
    assert pairs["abba_attn x compressed_attn"] == pytest.approx(0.0, abs=1e-9)
    # leave-one-out at the all-on operating point: the full cost of each, interactions included
    loo = {a: result.effects[a].leave_one_out.estimate for a in AXES}
    assert loo["lowrank_mlp"] == pytest.approx(0.30 + 0.04, abs=1e-9)
    assert loo["freeze"] == pytest.approx(-0.05 - 0.08, abs=1e-9)
    # the frontier's own points reach themselves (multiplier 1), a variant exactly on the truth line
    # of the dense model has gap 0; everything else is against the interpolated frontier
    for name in ("dense", "dense@0.2", "dense@0.5"):
        assert result.points[name].multiplier == pytest.approx(1.0, abs=1e-9)
    control = result.points["grow+finish"]
    x = true_flops({}) / DENSE_FLOPS
    assert control.gap.estimate == pytest.approx(2.0 - dense_loss(x), abs=1e-9)
    # loss 2.0 = dense_loss(b) at b = exp(-1/3): the multiplier is b / x
    assert control.multiplier == pytest.approx(math.exp(-1 / 3) / x, rel=1e-9)
    worst = result.points["grow+abba+lrmlp+finish"]   # 2.44: worse than dense@0.2 (2.38)
    assert worst.multiplier is None and worst.outside == "above" and worst.bound < 1


def test_confidence_intervals_cover_the_truth_at_the_nominal_rate():
    """Many noise draws of a 2^3 grid + 2 frontier points x 3 paired seeds, with seed offsets much
    larger than the noise: the paired t intervals cover the truth ~95% of the time (unpaired ones
    would cover ~100%; 2-SE normal ones with 18 df less). All draws are fit at once."""
    axes = ["a", "b", "c"]
    effect = {"a": 0.1, "b": -0.05, "c": 0.2}
    grid = {}
    for bits in range(8):
        state = {x: bool(bits >> i & 1) for i, x in enumerate(axes)}
        grid["+".join(x for x in axes if state[x]) or "none"] = state
    truth = {n: 2.0 + sum(effect[x] for x in axes if s[x]) + (0.06 if s["a"] and s["b"] else 0.0)
             for n, s in grid.items()}
    truth.update({"d@0.5": 2.2, "d": 2.0})
    flops = {n: 1.0 - 0.1 * sum(s.values()) for n, s in grid.items()} | {"d@0.5": 0.5, "d": 1.0}
    design = report.Design(axes, grid, "none", "a+b+c", ["d@0.5", "d"], "d")
    rows = [{"variant": n, "seed": s, "status": OK, "final_val_loss": mu, "training_flops": flops[n]}
            for n, mu in truth.items() for s in range(3)]
    # The contrasts the report tests (weights from one analysis), with their true values
    result = report.analyse_metric(rows, design, "final")
    frontier_at = lambda x: 2.0 - 0.2 * math.log(x) / math.log(2)   # noqa: E731 (the interpolation)
    checks = {"simple a": (result.effects["a"].simple, 0.1),
              "main a": (result.effects["a"].main, 0.13),
              "a x b": (result.pairs["a x b"], 0.03),
              "a | b on": (result.effects["a"].conditional["b"][1], 0.16),
              "loo c": (result.effects["c"].leave_one_out, 0.2),
              "gap none": (result.points["none"].gap, truth["none"] - frontier_at(0.9 + 0.1)),
              "gap a+b+c": (result.points["a+b+c"].gap, truth["a+b+c"] - frontier_at(0.7))}
    rng = np.random.default_rng(0)
    draws = 4000
    Y = (np.array([r["final_val_loss"] for r in rows])[:, None]
         + rng.normal(0, 0.5, (3, draws))[[r["seed"] for r in rows]]      # paired seed offsets
         + rng.normal(0, 0.02, (len(rows), draws)))
    layout = stats.fit_layout([(r["variant"], r["seed"], r["final_val_loss"]) for r in rows], Y)
    assert layout.df == (len(truth) - 1) * 2
    rates = {}
    for name, (e, true) in checks.items():
        assert e.estimate == pytest.approx(true, abs=1e-9)      # noise-free: exact
        lo, hi = stats.contrast(layout, e.weights).ci
        rates[name] = float(np.mean((lo <= true) & (true <= hi)))
    assert all(0.94 <= r <= 0.96 for r in rates.values()), rates


# ------------------------------------------------------------------ bugs of the old report


def test_all_free_axes_keep_the_all_off_cell_in_the_factorial(tmp_path):
    """Every axis free: the dense baseline IS the all-off cell; dropping it biased the main effects
    (a=+0.10, b=+0.20 came out as 0.00 and 0.15)."""
    spec = {"free_axes": ["a", "b"], "fixed_axes": {}, "variants": [
        {"name": "dense", "axes": {"a": False, "b": False}, "baseline": True, "budget": 1.0},
        {"name": "dense@0.5", "axes": {"a": False, "b": False}, "baseline": False, "budget": 0.5},
        {"name": "A", "axes": {"a": True, "b": False}, "baseline": False},
        {"name": "B", "axes": {"a": False, "b": True}, "baseline": False},
        {"name": "A+B", "axes": {"a": True, "b": True}, "baseline": False}]}
    design = report.design_of(spec)
    assert set(design.grid) == {"dense", "A", "B", "A+B"} and design.control == "dense"
    truth = {"dense": 2.0, "dense@0.5": 2.3, "A": 2.1, "B": 2.2, "A+B": 2.3}
    rows = [{"variant": n, "seed": 0, "status": OK, "final_val_loss": y, "training_flops": 1.0}
            for n, y in truth.items()]
    result = report.analyse_metric(rows, design, "final")
    assert result.effects["a"].main.estimate == pytest.approx(0.10)
    assert result.effects["b"].main.estimate == pytest.approx(0.20)
    assert result.factorial.complete


def test_incomplete_design_is_fit_by_least_squares_with_a_warning_or_refused(tmp_path):
    failed = {"grow+abba+lrmlp+finish_s0", "grow+abba+lrmlp+finish_s1"}
    exp = write_experiment(tmp_path, seeds=[0, 1], noise=0.0, fail=failed)
    result = analyse(exp)
    assert not result.factorial.complete
    assert any("incomplete" in w and "grow+abba+lrmlp+finish" in w and "least-squares" in w
               for w in result.warnings)
    # the truth has only two-way interactions, so the reduced model recovers it exactly
    for axis in AXES:
        assert result.effects[axis].main.estimate == pytest.approx(true_main(axis), abs=1e-9)
    text = "\n".join(report.metric_section(result, analyse_design(exp)))
    assert "- warning: the factorial is incomplete" in text
    # an unbalanced layout (one seed of one variant failed) is adjusted for the seed, with a warning
    result = analyse(write_experiment(tmp_path / "u", seeds=[0, 1], noise=0.0, seed_effect=0.3,
                                      fail={"grow+lrmlp+finish_s1"}))
    assert any(w.startswith("unbalanced") and "grow+lrmlp+finish (1/2 seeds)" in w for w in result.warnings)
    assert result.effects["lowrank_mlp"].simple.estimate == pytest.approx(0.30, abs=1e-9)
    # too few cells for main effects + two-way interactions: refused, simple effects still stand
    design = analyse_design(exp)
    keep = {"grow+finish", "grow+abba+finish", "grow+linformer+finish", "grow+lrmlp+finish",
            "grow+freeze+finish", "dense"}
    rows = [r for r in collect(exp) if r["variant"] in keep]
    result = report.analyse_metric(rows, design, "final")
    assert any("refused" in w for w in result.warnings)
    assert not result.effects["abba_attn"].main.defined and "refused" in result.effects["abba_attn"].main.note
    assert result.effects["abba_attn"].simple.estimate == pytest.approx(0.10, abs=1e-9)


def test_pareto_front_ignores_nan_points():
    points = [(1.0, 3.0), (2.0, 2.0), (3.0, 2.5), (4.0, 1.0), (2.0, 2.2), (0.5, 5.0)]
    assert analysis.pareto_front(points) == [5, 0, 1, 3]
    # A NaN used to be sorted with the rest (NaN compares false), scrambling the order.
    with_nan = [(math.nan, 0.1), *points[:3], (1.5, math.nan), *points[3:]]
    assert [with_nan[i] for i in analysis.pareto_front(with_nan)] == [points[i] for i in [5, 0, 1, 3]]
    rng = np.random.default_rng(0)
    pts = [tuple(p) for p in rng.random((60, 2))]
    pts[7], pts[19] = (math.nan, 0.0), (0.0, math.nan)
    front = set(analysis.pareto_front(pts))
    finite = [p for p in pts if not math.isnan(p[0] + p[1])]
    for i, (f, l) in enumerate(pts):
        dominated = math.isnan(f + l) or any(g <= f and m <= l and (g, m) != (f, l) for g, m in finite)
        assert (i in front) == (not dominated)


def test_unigram_entropy():
    assert analysis.unigram_entropy(np.array([3, 3, 3])) == pytest.approx(0.0)
    assert analysis.unigram_entropy(np.arange(256).repeat(4)) == pytest.approx(math.log(256))


def test_holm_adjusts_step_down_and_never_below_the_raw_p():
    es = [stats.Estimate(x, 1.0, 10) for x in (0.1, 3.0, 5.0, 2.2)]
    assert stats.holm(es) == 4
    raw = [e.p for e in es]
    order = np.argsort(raw)
    expected = np.maximum.accumulate([min(1, (4 - i) * raw[j]) for i, j in enumerate(order)])
    assert [es[j].p_holm for j in order] == pytest.approx(list(expected))
    assert all(e.p_holm >= e.p for e in es)


# ------------------------------------------------------------------ the report from files alone


def test_report_json_agrees_with_results_csv(tmp_path, capsys):
    exp = write_experiment(tmp_path, seeds=[0, 1], noise=0.01, seed_effect=0.05)
    assert report.main([str(exp)]) == 0
    printed = capsys.readouterr().out
    rows = read_csv(exp / RESULTS_CSV)
    out = json.loads((exp / "report.json").read_text())
    assert out["control"] == "grow+finish" and out["n_seeds"] == 2 and not out["one_seed"]
    assert set(out["metrics"]) == {"final", "before_finish", "realized"}
    spec = json.loads((exp / EXPERIMENT_JSON).read_text())
    grid = report.design_of(spec).grid
    for name, block in out["metrics"].items():
        loss_col, flops_col = {"final": ("final_val_loss", "training_flops"),
                               "before_finish": ("val_loss_before_finish", "flops_before_finish"),
                               "realized": ("val_loss_after_realize", "flops_before_finish")}[name]
        assert block["metric"] == loss_col
        cell = {v: np.mean([r[loss_col] for r in rows if r["variant"] == v]) for v in {r["variant"] for r in rows}}
        flops = {v: np.mean([r[flops_col] for r in rows if r["variant"] == v]) for v in cell}
        for v, c in block["cells"].items():
            assert c["loss_mean"] == pytest.approx(cell[v], abs=1e-9)
        by_state = {tuple(s[a] for a in AXES): v for v, s in grid.items()}
        for axis in AXES:
            e = block["effects"][axis]
            on = by_state[tuple(a == axis for a in AXES)]
            assert e["simple"]["estimate"] == pytest.approx(cell[on] - cell["grow+finish"], abs=1e-9)
            main = (np.mean([cell[v] for v, s in grid.items() if s[axis]])
                    - np.mean([cell[v] for v, s in grid.items() if not s[axis]]))
            assert e["main"]["estimate"] == pytest.approx(main, abs=1e-9)
            for effect in (e["simple"], e["main"], e["leave_one_out"]):
                assert effect["p_holm"] >= effect["p"] and effect["ci_low"] < effect["estimate"] < effect["ci_high"]
            assert e["interaction_dominated"] is (e["largest_interaction"] >= abs(e["main"]["estimate"]))
        dense = ["dense@0.2", "dense@0.5", "dense"]
        lx = np.log([flops[v] for v in dense])
        for v, p in block["frontier"].items():
            assert p["flops"] == pytest.approx(flops[v]) and p["loss_mean"] == pytest.approx(cell[v])
            if v in dense:
                assert p["compute_multiplier"] == pytest.approx(1.0, abs=1e-6)
            if lx[0] <= math.log(flops[v]) <= lx[-1]:
                frontier_loss = np.interp(math.log(flops[v]), lx, [cell[d] for d in dense])
                assert p["loss_gap"] == pytest.approx(cell[v] - frontier_loss, abs=1e-9)
            if p["compute_multiplier"] is not None and v not in dense:
                # the frontier reaches the variant's loss at multiplier x its FLOPs
                reach = math.log(p["compute_multiplier"] * flops[v])
                assert np.interp(reach, lx, [cell[d] for d in dense]) == pytest.approx(cell[v], abs=1e-9)
                lo, hi = p["compute_multiplier_ci"]
                assert (lo is None or lo < p["compute_multiplier"]) and (hi is None or hi > p["compute_multiplier"])
            if p["compute_multiplier"] is None:
                assert p["outside"] in ("above", "below", "flops")
    assert "realized" in out["metrics"] and out["family_size"] > 100
    # min_block_lr_ratio from the trainer's run_start record (contract item 2)
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["grow+finish"]["min_block_lr_ratio"] == pytest.approx(0.6)
    assert by_variant["dense@0.5"]["min_block_lr_ratio"] == pytest.approx(1.0)
    text = (exp / "report.md").read_text()
    assert "significant (p_holm = " in text and "not significant (p_holm = " in text
    assert stats.NOT_ALONE in text and "Simple effects against the control `grow+finish`" in text
    assert text.index("## Cells") < text.index("### Simple effects") < text.index("### Factorial main effects")
    assert "| grow+finish (control) |" in printed


def test_report_rebuilds_from_logged_files_alone_with_one_seed(tmp_path, capsys):
    failed = "dense@0.5_s0"     # the frontier then interpolates between dense@0.2 and dense
    exp = write_experiment(tmp_path, seeds=[0], noise=0.01, fail={failed})
    assert report.main([str(exp)]) == 0
    printed = capsys.readouterr().out
    for name in ("results.csv", "report.md", "report.json", "pareto.png", "effects.png", "curves.png"):
        assert (exp / name).is_file() and (exp / name).stat().st_size > 0
    rows = read_csv(exp / RESULTS_CSV)
    assert len(rows) == 19
    by_trial = {f"{r['variant']}_s{r['seed']}": r for r in rows}
    assert by_trial[failed]["status"] == "error"
    full = by_trial["grow+abba+compressed+lrmlp+freeze+finish_s0"]
    assert full["axes"] == {"layerwise": True, "abba_attn": True, "compressed_attn": True,
                            "lowrank_mlp": True, "freeze": True, "finish": True}
    # before-finish loss is the last eval before the model was realized; then the realized eval
    assert full["val_loss_before_finish"] == pytest.approx(full["final_val_loss"] + 0.5 + 0.03)
    assert full["val_loss_after_realize"] == pytest.approx(full["val_loss_before_finish"] + 0.2)
    assert full["flops_before_finish"] == pytest.approx(0.8 * full["training_flops"])
    # parameter counts are the approximated model's, not the dense one the finish trains
    assert full["peak_trainable_params"] == 5e5 + 4 and full["total_params"] == 1e6
    assert full["training_flops"] == pytest.approx(true_flops(full["axes"]))
    dense = by_trial["dense_s0"]
    assert dense["val_loss_before_finish"] == dense["final_val_loss"] == pytest.approx(1.9, abs=0.05)
    assert dense["val_loss_after_realize"] == dense["final_val_loss"]
    assert by_trial["dense@0.2_s0"]["budget"] == 0.2 and not by_trial["dense@0.2_s0"]["baseline"]
    text = (exp / "report.md").read_text()
    assert "3.2000 nats/token" in text
    assert f"Dense baseline val loss: **{dense['final_val_loss']:.4f}**" in text
    assert stats.ONE_SEED in text and "Lenth pseudo-SE" in text and failed in text
    assert "significant (p_holm" not in text and "n/a (one seed)" in text
    out = json.loads((exp / "report.json").read_text())
    assert out["one_seed"] and out["family_size"] == 0
    final = out["metrics"]["final"]
    simple = final["effects"]["abba_attn"]["simple"]
    assert simple["estimate"] == pytest.approx(EFFECT["abba_attn"], abs=0.05) and simple["p_holm"] is None
    main = final["effects"]["lowrank_mlp"]["main"]
    assert main["p_holm"] is None and main["ci_low"] is None and 0 < main["pseudo_se"] < 0.05
    assert final["frontier"]["dense@0.2"]["compute_multiplier"] == pytest.approx(1.0)
    assert "dense@0.5" not in final["frontier"] and "| dense@0.5 " not in printed
