"""The rank search: break-even from the accounting, grids below it, the budgeted allocation, the
outputs built from trial directories (best.yaml validates), and (slow) the whole pipeline on Ray."""
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distributed.config import ConfigError, apply_overrides, load_config
from tune import rank_search as rs
from tune.allocation import Option, allocate, lower_hull, mean_ci
from tune.frontier import compute_multiplier, frontier_of_means
from tune.results import OK, TRIAL_JSON, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/rank_search/tiny.yaml"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def tiny_model():
    config = rs.load_rank_search(TINY)
    return rs.experiment_for(rs.base_experiment(config), seed=0, name="probe", run_dir="unused").model


@pytest.mark.parametrize("site,kind,fixed,closed_form", [
    # lowrank: 2r(in + out) < 2 in out  <=>  r < in out / (in + out)
    ("mlp_fc", "lowrank", {}, lambda d: math.ceil(4 * d * d / (5 * d))),      # 102.4 -> 103
    ("attn_qkv", "lowrank", {}, lambda d: math.ceil(3 * d * d / (4 * d))),    # 96: equal is no saving
    # abba: 2 r^2 (in + out) < 2 in out  <=>  r^2 < in out / (in + out)
    ("attn_proj", "abba", {}, lambda d: next(r for r in range(1, d) if r * r * 2 * d >= d * d)),
    # compressed at T=128, chunk 16 (n = 8 chunks), window 8: per token the scores and values
    # 4d(7s + 24), the pooling 1.75ds (weight matmul) + 3.5ds (P^T K, P^T V), all trained (x3),
    # against causal full attention 2d(T + 1) (x3): 33.25 s + 96 >= 258  <=>  s >= 4.87. Slots 5
    # costs more than full attention, so the search must price what the config refuses.
    ("attention", "compressed", {"chunk": 16, "window": 8}, lambda d: 5),
    # chunk 32, window 16 (n = 4): 16.5 s + 192 >= 258 <=> s >= 4: equal cost is no saving
    ("attention", "compressed", {"chunk": 32, "window": 16}, lambda d: 4),
])
def test_break_even_comes_from_the_accounting(tiny_model, site, kind, fixed, closed_form):
    even = rs.break_even(tiny_model, site, kind, fixed)
    knob = rs.KNOBS[kind]
    dense = rs.site_training_flops(tiny_model, site, None)
    # the defining property, by the accounting: one below saves FLOPs, at break-even it does not
    assert rs.site_training_flops(tiny_model, site, knob.spec(even - 1, fixed)) < dense
    assert rs.site_training_flops(tiny_model, site, knob.spec(even, fixed, probe=True)) >= dense
    assert even == closed_form(tiny_model.n_embd)
    if kind == "compressed":   # the config refuses what costs more than full attention, unprobed
        costlier = knob.spec(even + 1, fixed)
        with pytest.raises(ValueError, match="allow_costlier"):
            rs.site_training_flops(tiny_model, site, costlier)


def test_shipped_configs_sweep_strictly_below_break_even():
    for path in sorted((ROOT / "configs/rank_search").glob("*.yaml")):
        config = rs.load_rank_search(path)
        plan = rs.check_space(config)
        assert set(plan.grids) == set(config.sites)
        for site, grid in plan.grids.items():
            assert grid and max(grid) < plan.break_even[site], (path.name, site)
        assert len(config.seeds) >= 2 and len(config.allocation.seeds) >= 3
        trials = [s.trial_name for s in plan.specs]
        assert len(trials) == len(set(trials))


def test_bad_configs_fail_before_ray_with_the_key():
    with pytest.raises(ConfigError, match="strictly below the FLOPs break-even 103"):
        rs.check_space(rs.load_rank_search(TINY, ['sites."mlp_fc".ranks=[4, 200]']))
    with pytest.raises(ConfigError, match="sites: 'mlp' is not a site"):
        rs.load_rank_search(TINY, ["sites.mlp={kind: lowrank}"])
    with pytest.raises(ConfigError, match="sites.attention.kind = 'lowrank'"):
        rs.load_rank_search(TINY, ["sites.attention.kind=lowrank"])
    with pytest.raises(ConfigError, match="n_startup_trials = 8 must be at most half"):
        rs.load_rank_search(TINY, ["refine.n_startup_trials=8"])
    with pytest.raises(ConfigError, match="budgets"):
        rs.load_rank_search(TINY, ["allocation.budgets=[1.5]"])


def test_quoted_override_segments_reach_keys_with_dots():
    raw = apply_overrides({"space": {"approx.mlp_fc.rank": {"low": 4, "high": 128}}},
                          ['space."approx.mlp_fc.rank".high=64'])
    assert raw == {"space": {"approx.mlp_fc.rank": {"low": 4, "high": 64}}}
    for bad in ['a."b.c', 'a."b"c=1', "a..b=1"]:
        with pytest.raises(ConfigError, match="override"):
            apply_overrides({}, [bad if "=" in bad else bad + "=1"])


def test_log_grid_properties():
    for low, high, points in [(2, 77, 3), (1, 9, 8), (4, 4, 3), (3, 1000, 6)]:
        grid = rs.log_grid(low, high, points)
        assert grid == sorted(set(grid)) and grid[0] >= low and grid[-1] == high
        assert len(grid) <= points
    assert rs.log_grid(5, 4, 3) == []


def _brute_force(curves, budget):
    best = None
    for combo in itertools.product(*curves.values()):
        if sum(o.cost for o in combo) <= budget:
            loss = sum(o.loss for o in combo)
            best = loss if best is None else min(best, loss)
    return best


def test_allocation_on_convex_curves_finds_the_optimum():
    # Two convex curves. Marginal loss per FLOP saved of each step: a: 8 .0017, 4 .005, 2 .0133;
    # b: 16 .0005, 8 .0025, 4 .019. Greedy takes b16, a8, b8, a4, a2, b4: the path's vertices.
    curves = {"a": [Option(None, 0, 0), Option(8, -30, 0.05), Option(4, -60, 0.2), Option(2, -90, 0.6)],
              "b": [Option(None, 0, 0), Option(16, -40, 0.02), Option(8, -80, 0.12), Option(4, -100, 0.5)]}
    vertices = {0: (None, None), -40: (None, 16), -70: (8, 16), -110: (8, 8), -140: (4, 8),
                -170: (2, 8), -190: (2, 4)}
    for budget, knobs in vertices.items():
        chosen = allocate(curves, budget)
        assert (chosen["a"].knob, chosen["b"].knob) == knobs
        # the known optimum (exhaustive search) at every vertex of the marginal-analysis path
        assert sum(o.loss for o in chosen.values()) == pytest.approx(_brute_force(curves, budget))
    # Between vertices: always within budget, and never worse than the next vertex that fits.
    for budget in range(-190, 1, 5):
        chosen = allocate(curves, budget)
        assert sum(o.cost for o in chosen.values()) <= budget
        fits = max(v for v in vertices if v <= budget)
        assert sum(o.loss for o in chosen.values()) <= _brute_force(curves, fits) + 1e-12
    assert allocate(curves, -191) is None


def test_allocation_random_convex_curves_fit_and_are_optimal_on_the_path():
    rng = random.Random(0)
    for _ in range(30):
        curves = {}
        for site in "abc":
            # convex: the loss added per FLOP saved grows with every step down in rank
            slopes = sorted(rng.uniform(0.001, 0.05) for _ in range(3))
            opts, cost, loss = [Option(None, 0.0, 0.0)], 0.0, 0.0
            for i, slope in enumerate(slopes):
                step = rng.uniform(10, 50)
                cost, loss = cost - step, loss + slope * step
                opts.append(Option(i, cost, loss))
            curves[site] = opts
        # The path of marginal analysis: every step of every site in order of its loss added per
        # FLOP saved (convex curves: each site's own steps come in rank order).
        steps = sorted((-(b.loss - a.loss) / (b.cost - a.cost), b.cost - a.cost)
                       for opts in curves.values() for a, b in zip(opts, opts[1:]))
        vertices = list(itertools.accumulate([0.0] + [cost for _, cost in steps]))
        for budget in vertices:   # the known optimum at every vertex
            chosen = allocate(curves, budget + 1e-9)
            assert sum(o.loss for o in chosen.values()) == pytest.approx(_brute_force(curves, budget + 1e-9))
        for budget in [rng.uniform(vertices[-1], 0) for _ in range(5)]:
            chosen = allocate(curves, budget)
            assert sum(o.cost for o in chosen.values()) <= budget
            fits = max(v for v in vertices if v <= budget)
            assert sum(o.loss for o in chosen.values()) <= _brute_force(curves, fits + 1e-9) + 1e-12


def test_lower_hull_drops_dominated_and_concave_points():
    hull = lower_hull([Option(None, 0, 0), Option(1, -10, 0.5), Option(2, -20, 0.6),
                       Option(3, -5, 0.9)])   # 3: costlier than 1 and worse; 1: above the chord
    assert [o.knob for o in hull] == [2, None]


def test_dense_frontier_multiplier():
    # the ablation report's frontier (tune/frontier.py), built from the search's mean losses
    f = frontier_of_means({"dense@0.25": (1e9, 3.0), "dense@0.5": (2e9, 2.5), "dense": (4e9, 2.2)})
    assert compute_multiplier(f, 2.5, 1e9) == pytest.approx(2.0)
    assert compute_multiplier(f, 2.2, 4e9) == pytest.approx(1.0)
    # outside the frontier's losses: no extrapolation
    assert compute_multiplier(f, 2.0, 1e9) is None and compute_multiplier(f, 3.5, 1e9) is None
    assert 2.0 < compute_multiplier(f, 2.3, 1e9) < 4.0
    assert frontier_of_means({"dense": (4e9, 2.2)}) is None          # one point is no frontier
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo < 2.0 < hi and hi - 2.0 == pytest.approx(4.303 * 1 / 3 ** 0.5, rel=1e-3)
    assert mean_ci([1.0]) == (1.0, None, None)


def test_allocation_outside_the_frontier_gets_a_bound_and_can_be_best():
    f = frontier_of_means({"dense@0.25": (1e9, 3.0), "dense@0.5": (2e9, 2.5), "dense": (4e9, 2.2)})
    assert rs.outside_frontier(f, 2.3, 1e9) == (None, None)          # inside: a multiplier exists
    # below the full dense run's loss at 1.5e9 FLOPs: pays off by more than 4e9 / 1.5e9
    assert rs.outside_frontier(f, 2.1, 1.5e9) == ("below", pytest.approx(4e9 / 1.5e9))
    # above the cheapest dense point's loss at 2e9 FLOPs: pays off by less than 1e9 / 2e9
    assert rs.outside_frontier(f, 3.1, 2e9) == ("above", pytest.approx(0.5))

    def entry(loss, mult, outside=None, bound=None):
        return {"loss": loss, "compute_multiplier": mult, "outside_frontier": outside,
                "compute_multiplier_bound": bound}

    # a lower bound above every point estimate wins; one below it does not; an upper bound never
    assert rs.choose_best({"0.5": entry(2.4, 1.5), "0.65": entry(2.1, None, "below", 1.6)}) == "0.65"
    assert rs.choose_best({"0.5": entry(2.4, 2.0), "0.65": entry(2.1, None, "below", 1.6)}) == "0.5"
    assert rs.choose_best({"0.5": entry(3.2, None, "above", 0.9), "0.8": entry(2.3, 1.1)}) == "0.8"
    assert rs.choose_best({"0.5": entry(3.2, None, "above", 0.9), "0.8": entry(3.1, None)}) == "0.8"


def test_refinement_space_and_knee():
    from tune.rank_refine import knee, refine_space

    space = refine_space({"mlp_fc": 40, "attn_qkv": 7, "attention": None},
                         {"mlp_fc": 103, "attn_qkv": 10, "attention": 9}, span=2.0)
    assert space == {"mlp_fc": (20, 80), "attn_qkv": (4, 9)}   # clipped below break-even 10
    trials = [{"loss": 2.00, "training_flops": 9.0}, {"loss": 2.02, "training_flops": 5.0},
              {"loss": 2.10, "training_flops": 1.0}, {"loss": None, "training_flops": 0.5}]
    assert knee(trials, noise=0.03) is trials[1]      # cheapest within noise of the best
    assert knee(trials, noise=0.0) is trials[0]
    assert knee([], 0.1) is None


def _fake_trial(spec, loss, flops):
    run_dir = Path(spec.run_dir)
    write_json_atomic(run_dir / TRIAL_JSON, {"status": OK})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "eval", "step": 5, "time": 1.0, "val_loss": loss + 0.05, "flops": flops / 2},
        {"event": "eval", "step": 10, "time": 2.0, "val_loss": loss, "flops": flops,
         "when": "realized"},
        {"event": "eval", "step": 12, "time": 3.0, "val_loss": loss - 0.01, "flops": flops}]) + "\n")


def test_outputs_from_trial_directories(tmp_path):
    """Synthetic losses (a convex curve per site) through sweep.csv, the allocation (which must fit
    every budget by the accounting), ranks.json, ranks.md and a best.yaml that load_config takes."""
    # three sites of two kinds (fewer than the config's five keeps this test quick)
    config = rs.load_rank_search(TINY, [f"out_dir={tmp_path}", "sites={mlp_fc: {kind: lowrank, low: 4}, "
                                        "attn_qkv: {kind: abba}, attention: {kind: compressed, "
                                        "fixed: {chunk: 16, window: 8}}}",
                                        "allocation.budgets=[0.7, 0.85]"])   # these three reach 0.67
    plan = rs.sweep_plan(config, tmp_path)
    dense_flops = rs.estimated_training_flops(
        rs.experiment_for(rs.base_experiment(config), seed=0, name="p", run_dir="u"), 1)
    for spec in plan.specs:
        r = spec.record
        if r["role"] == "frontier":
            _fake_trial(spec, 2.0 + 0.5 * (1 - r["fraction"]) + 0.001 * r["seed"] % 7, dense_flops * r["fraction"])
        else:
            top = plan.break_even[r["site"]]
            _fake_trial(spec, 2.0 + 0.3 * (1 - r["rank"] / top) ** 2 + 0.001 * (r["seed"] % 7),
                        dense_flops * 0.9)
    sweep = rs.sweep_outputs(config, tmp_path, plan)
    assert (tmp_path / rs.SWEEP_CSV).read_text().splitlines()[0] == ",".join(rs.ROW_COLUMNS)
    assert all((tmp_path / f"sweep_{site}.png").is_file() for site in config.sites)
    allocations = rs.plan_allocations(config, sweep.curves, 1)
    base = rs.base_experiment(config)
    for key, alloc in allocations.items():
        assert alloc["feasible"], key
        cfg = rs.experiment_for(base, seed=0, name="p", run_dir="u", approx=alloc["approx"])
        assert rs.estimated_training_flops(cfg, 1) <= float(key) * dense_flops   # by the accounting
        for site, rank in alloc["ranks"].items():
            assert rank is None or rank in plan.grids[site]
    specs = rs.allocation_specs(config, tmp_path, allocations)
    assert len(specs) == len(allocations) * 3
    for spec in specs:
        _fake_trial(spec, 2.05 + 0.1 * (1 - spec.record["fraction"]), dense_flops * spec.record["fraction"])
    result = rs.allocation_outputs(config, tmp_path, plan, sweep, allocations, specs)
    ranks = json.loads((tmp_path / rs.RANKS_JSON).read_text())
    assert set(ranks) == {"0.7", "0.85"}
    for key, entry in ranks.items():
        assert set(config.sites) <= set(entry) and entry["fits_budget"]
        assert entry["ci"][0] <= entry["loss"] <= entry["ci"][1]
        assert "compute_multiplier" in entry
    assert result["best"] in ranks
    cfg = load_config(tmp_path / "best.yaml")     # runs as-is with the trainer
    raw = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert "cache_dir" not in raw["data"] and cfg.train.max_steps == 200
    assert "| budget |" in (tmp_path / "ranks.md").read_text()


@pytest.mark.slow
def test_rank_search_on_ray_then_best_yaml_trains(tmp_path):
    """The whole pipeline on a local Ray instance at micro scale: one site at one rank and the dense
    run (one wave of two trials), one allocation; then best.yaml trains as-is."""
    env = dict(os.environ, APPROXGPT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "search"
    micro = ["overrides=[model.n_layer=2, model.n_embd=32, model.n_head=2, model.block_size=32, "
             "train.micro_batch_size=4, train.max_steps=12, train.warmup_steps=2, "
             "train.eval_interval=4, data.val_tokens=1024, deepspeed.zero_stage=0, wandb.enabled=false]",
             "sites={mlp_fc: {kind: lowrank, ranks: [4]}}", "seeds=[1]",
             "frontier.budgets=[]", "allocation.budgets=[0.9]", "allocation.seeds=[1]",
             "resources.max_concurrent_trials=2"]
    result = subprocess.run([sys.executable, "-m", "tune.rank_search", "--config", str(TINY),
                             "--out-dir", str(out), *micro],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    rows = list(csv_rows(out / rs.SWEEP_CSV))
    assert len(rows) == 2 and all(r["status"] == OK for r in rows)
    assert [r["rank"] for r in rows if r["role"] == "sweep"] == ["4"]
    assert all(float(r["final_loss"]) > 0 and float(r["training_flops"]) > 0 for r in rows)
    ranks = json.loads((out / rs.RANKS_JSON).read_text())
    assert ranks["0.9"]["fits_budget"] and ranks["0.9"]["n_seeds"] == 1
    assert ranks["0.9"]["mlp_fc"] == 4 and ranks["0.9"]["loss"] > 0
    assert (out / "tune_allocation").is_dir()
    for name in ("ranks.md", "sweep_mlp_fc.png", "best.yaml"):
        assert (out / name).is_file(), name
    # best.yaml runs as-is with the trainer (its out_dir is relative: runs/<name>-best)
    run = subprocess.run([sys.executable, "-m", "distributed.train", "--config", str(out / "best.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert (tmp_path / "runs/rank-search-tiny-best/final/model.safetensors").is_file()


def csv_rows(path):
    import csv
    with open(path, newline="") as f:
        yield from csv.DictReader(f)
