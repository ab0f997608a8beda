"""The ablation grid: expansion, fixed axes, constraints, the dense baseline, names, validation."""
import itertools
from pathlib import Path

import pytest
import yaml

from distributed.config import ConfigError
from tune.grid import (BASELINE_NAME, TrialSpec, expand, experiment_config, experiment_record,
                       load_ablation, validate_grid)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/ablation/tiny.yaml"
CPU_SMALL = ROOT / "configs/ablation/cpu-small.yaml"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    # Ablation configs name their base experiment relative to the repository root.
    monkeypatch.chdir(ROOT)


def test_tiny_grid_is_16_variants_plus_the_dense_baseline_and_frontier():
    grid = expand(load_ablation(TINY))
    assert len(grid.variants) == 16 + 1 + 2
    baseline = grid.variants[0]
    assert baseline.name == BASELINE_NAME and baseline.baseline
    assert not any(baseline.axes.values())
    grid_variants = [v for v in grid.variants if not v.baseline and v.budget == 1.0]
    assert len(grid_variants) == 16
    free = grid.config.free_axes
    assert set(free) == {"abba_attn", "compressed_attn", "lowrank_mlp", "freeze"}
    # every on/off combination of the four free axes exactly once, fixed axes held on
    combos = {tuple(v.axes[a] for a in free) for v in grid_variants}
    assert combos == set(itertools.product((False, True), repeat=4))
    assert all(v.axes["layerwise"] and v.axes["finish"] for v in grid_variants)
    validate_grid(grid)


def test_unfixing_the_finish_axis_gives_32_variants():
    grid = expand(load_ablation(TINY, ["axes.finish.fixed=null"]))
    assert len(grid.variants) == 35  # 32 + baseline + 2 frontier points
    assert len({v.name for v in grid.variants}) == 35


def test_cpu_small_is_the_32_variant_grid_with_the_growth_control():
    """Issue 12: the seed's 32 variants (4 on/off axes x finish, all grown) and the dense baseline,
    which differs from the grid's dense `grow` variant in growth alone."""
    grid = expand(load_ablation(CPU_SMALL))
    full_budget = [v for v in grid.variants if v.budget == 1.0]
    assert len(full_budget) == 33
    assert sorted(v.budget for v in grid.variants if v.budget < 1.0) == [0.25, 0.5, 0.75]  # the frontier
    assert set(grid.config.free_axes) == {"abba_attn", "compressed_attn", "lowrank_mlp", "freeze", "finish"}
    baseline = next(v for v in full_budget if v.name == "dense")
    assert all(v.axes["layerwise"] for v in full_budget if v is not baseline)
    grow = next(v for v in grid.variants if v.name == "grow")
    assert {a for a in grow.axes if grow.axes[a] != baseline.axes[a]} == {"layerwise"}


def test_variant_names_say_which_approximations_are_on():
    grid = expand(load_ablation(TINY))
    labels = {name: spec.label for name, spec in grid.config.axes.items()}
    for v in grid.variants[1:]:
        if v.budget < 1.0:
            continue
        tokens = set(v.name.split("+"))
        assert tokens == {labels[a] for a, on in v.axes.items() if on}
    assert len({v.name for v in grid.variants}) == len(grid.variants)


def test_overrides_reach_each_trial_config():
    grid = expand(load_ablation(TINY))
    by_name = {v.name: v for v in grid.variants}
    full = experiment_config(grid.config, TrialSpec(by_name["grow+abba+compressed+lrmlp+freeze+finish"], 7), "/tmp/r")
    assert full.approx.attn_qkv.kind == "abba" and full.approx.attention.kind == "compressed"
    assert full.approx.mlp_fc.kind == "lowrank" and full.schedule.freeze_previous
    assert full.schedule.layerwise and full.schedule.full_rank_finish
    assert full.seed == 7 and full.out_dir == "/tmp/r"
    dense = experiment_config(grid.config, TrialSpec(by_name[BASELINE_NAME], 7), "/tmp/r")
    assert not dense.model.approx.approximated and dense.approx.attention.kind == "full"
    assert not dense.schedule.layerwise and not dense.schedule.freeze_previous
    assert not dense.schedule.full_rank_finish
    # the shared overrides (equal token budget) apply to every variant
    assert dense.train.max_steps == full.train.max_steps


def test_requires_drops_freezing_without_growth(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["axes"]["layerwise"].pop("fixed")  # growth becomes a free axis
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    grid = expand(load_ablation(path))
    assert grid.dropped and all("freeze" in name and "grow" not in name for name in grid.dropped)
    assert not any(v.axes["freeze"] and not v.axes["layerwise"] for v in grid.variants)
    # 32 combinations of 5 free axes, minus the 8 with freeze on and growth off, plus the baseline
    assert len(grid.variants) == 32 - 8 + 1 + 2
    validate_grid(grid)


def test_seeds_repeat_every_variant_with_stable_trial_names():
    grid = expand(load_ablation(TINY, ["seeds=[1, 2, 3]"]))
    trials = grid.trials()
    assert len(trials) == 3 * 19
    assert len({t.trial_name for t in trials}) == len(trials)
    record = experiment_record(grid)
    assert [t["trial_name"] for t in record["trials"]] == [t.trial_name for t in trials]
    assert [t.trial_name for t in expand(load_ablation(TINY, ["seeds=[1, 2, 3]"])).trials()] == \
        [t.trial_name for t in trials]


def test_bad_axis_override_fails_before_ray_with_the_variant_name():
    grid = expand(load_ablation(TINY, ["axes.lowrank_mlp.when_on=[approx.mlp_fc.rank=100000]"]))
    with pytest.raises(ConfigError, match=r"variant grow\+lrmlp\+finish.*rank"):
        validate_grid(grid)


def test_frontier_points_are_the_dense_baseline_with_its_own_shorter_schedule():
    grid = expand(load_ablation(TINY, ["frontier.budgets=[0.5, 0.25]"]))
    frontier = [v for v in grid.variants if v.budget < 1.0]
    assert [(v.name, v.budget) for v in frontier] == [("dense@0.25", 0.25), ("dense@0.5", 0.5)]
    assert not any(v.baseline or any(v.axes.values()) for v in frontier)   # rank search needs one baseline
    dense = experiment_config(grid.config, TrialSpec(grid.variants[0], 3), "/tmp/r")
    for v in frontier:
        cfg = experiment_config(grid.config, TrialSpec(v, 3), "/tmp/r")
        # the whole schedule shrinks (cosine decay to max_steps), nothing else changes
        assert cfg.train.max_steps == round(dense.train.max_steps * v.budget)
        assert cfg.train.warmup_steps == round(dense.train.warmup_steps * v.budget)
        assert cfg.model_dump(exclude={"train", "name"}) == dense.model_dump(exclude={"train", "name"})
        assert cfg.train.learning_rate == dense.train.learning_rate and cfg.seed == 3
    record = experiment_record(grid)
    assert {t["trial_name"]: t["budget"] for t in record["trials"]}["dense@0.25_s1337"] == 0.25
    assert not [v for v in expand(load_ablation(TINY, ["frontier.budgets=[]"])).variants if v.budget < 1]
    with pytest.raises(ConfigError, match=r"frontier\.budgets.*1\.0.*valid: 0 < budget < 1"):
        load_ablation(TINY, ["frontier.budgets=[0.5, 1.0]"])
    with pytest.raises(ConfigError, match="duplicates"):
        load_ablation(TINY, ["frontier.budgets=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"dense@0\.5, dense@0\.501 all train 150 steps"):
        validate_grid(expand(load_ablation(TINY, ["frontier.budgets=[0.5, 0.501]"])))


def test_report_control_must_name_a_variant_of_the_grid():
    assert expand(load_ablation(TINY, ["report.control=grow+abba+finish"])).config.report.control \
        == "grow+abba+finish"
    with pytest.raises(ConfigError, match=r"report\.control: 'grow\+nope'.*valid: dense, grow\+finish"):
        expand(load_ablation(TINY, ["report.control=grow+nope"]))
    with pytest.raises(ConfigError, match=r"report\.operating_point"):
        expand(load_ablation(TINY, ["report.operating_point=dense@0.2"]))   # not a grid variant
    with pytest.raises(ConfigError, match="report"):
        load_ablation(TINY, ["report.colour=red"])


def test_config_mistakes_are_named():
    with pytest.raises(ConfigError, match="requires"):
        load_ablation(TINY, ["requires={freeze: [nonexistent]}"])
    with pytest.raises(ConfigError, match="seeds"):
        load_ablation(TINY, ["seeds=[1, 1]"])
    with pytest.raises(ConfigError, match="labels"):
        load_ablation(TINY, ["axes.freeze.label=abba"])


@pytest.mark.parametrize("path", [TINY, CPU_SMALL])
def test_shipped_ablation_configs_validate(path):
    validate_grid(expand(load_ablation(path)))


def test_wandb_is_offline_without_a_key(monkeypatch, tmp_path):
    from tune.wandb_logging import wandb_callbacks

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    config = load_ablation(TINY, ["wandb.enabled=true"])
    (callback,) = wandb_callbacks(config.wandb, config.name, tmp_path)
    assert callback.kwargs["mode"] == "offline" and callback.project == "approxgpt-ablation"
    assert (tmp_path / "wandb").is_dir()
    assert wandb_callbacks(load_ablation(TINY).wandb, "x", tmp_path) == []


REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("model", "data", "distributed", "tune", "cluster", "bench")


def private_imports(source: str) -> list[str]:
    """Imports of private Ray/DeepSpeed modules or names (`ray.train._internal`, `_WandbLoggingActor`),
    and attribute chains into them (`ray._private.state`), in one file's source."""
    import ast

    def private(dotted: str) -> bool:
        parts = dotted.split(".")
        return parts[0] in ("ray", "deepspeed") and any(p.startswith("_") for p in parts[1:])

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{node.module}.{a.name}" for a in node.names if private(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and private(".".join([inner.id, *reversed(chain)])):
                found.append(".".join([inner.id, *reversed(chain)]))
    return found


def test_no_private_ray_or_deepspeed_internals_in_the_project():
    """A Ray rename must not silently break (or silently disable) anything: the project uses only
    public Ray/DeepSpeed API. The scanner itself is checked on the imports that used to be here."""
    assert private_imports("from ray.train._internal.session import get_session") \
        == ["ray.train._internal.session.get_session"]
    assert private_imports("from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor") \
        == ["ray.air.integrations.wandb._WandbLoggingActor"]
    assert private_imports("import ray\nray._private.state.state.get_draining_nodes()")
    assert private_imports("import ray.train\nray.train.get_preemption_info()") == []
    offenders = {str(path.relative_to(REPO)): found for package in PROJECT_PACKAGES
                 for path in sorted((REPO / package).rglob("*.py"))
                 if (found := private_imports(path.read_text()))}
    assert offenders == {}

