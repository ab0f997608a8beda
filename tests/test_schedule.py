"""The stage plan and the LR schedule: pure functions of the config."""
import itertools
import math
from pathlib import Path

import pytest
import torch
import yaml

from distributed.config import load_config
from distributed.schedule import (block_budgets, build_plan, dense_lr_integral, format_budgets,
                                  format_plan, learning_rate, new_parameter_names, new_parameter_warmup,
                                  plan_record, split_steps, stage_at, tokens_per_step)
from distributed.train import apply_stage
from model import GPT

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/experiments/tiny.yaml"

# Every combination of the schedule's switches that the config accepts.
VARIANTS = [
    {"schedule.layerwise": lw, "schedule.freeze_previous": fp, "schedule.freeze_embeddings": fe,
     "schedule.full_rank_finish": fr}
    for lw, fp, fe, fr in itertools.product([True, False], repeat=4)
    if (lw or not fp) and (fp or not fe)
]


def config(**overrides):
    return load_config(TINY, [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                              for k, v in overrides.items()])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(
    k.split(".")[1] for k, on in v.items() if on) or "plain")
@pytest.mark.parametrize("world_size", [1, 4])
def test_every_variant_trains_on_the_same_token_budget(variant, world_size):
    cfg = config(**variant)
    plan = build_plan(cfg, world_size)
    assert sum(s.steps for s in plan) == cfg.train.max_steps
    assert sum(s.tokens for s in plan) == cfg.train.max_steps * tokens_per_step(cfg, world_size)
    # Stages tile the steps: contiguous, in order, none empty.
    assert plan[0].start_step == 0 and all(s.steps >= 1 for s in plan)
    assert all(a.end_step == b.start_step for a, b in zip(plan, plan[1:]))
    assert plan[-1].end_step == cfg.train.max_steps


def test_layerwise_growth_appends_one_block_per_stage_and_freezes_the_older_ones():
    cfg = config(**{"model.n_layer": 5, "schedule.initial_layers": 2, "schedule.freeze_embeddings": True})
    plan = build_plan(cfg)
    growth, finish = plan[:-1], plan[-1]
    assert [s.n_blocks for s in growth] == [2, 3, 4, 5]
    assert growth[0].frozen_blocks == () and not growth[0].embeddings_frozen
    for s in growth[1:]:
        assert s.frozen_blocks == tuple(range(s.n_blocks - 1))
        assert s.trainable_blocks == (s.n_blocks - 1,) and s.embeddings_frozen
    assert not any(s.realize for s in growth)
    assert finish.realize and finish.n_blocks == 5 and finish.frozen_blocks == () \
        and not finish.embeddings_frozen
    assert finish.steps == round(cfg.schedule.finish_fraction * cfg.train.max_steps)


def test_without_layerwise_growth_every_block_exists_from_the_start():
    plan = build_plan(config(**{"schedule.layerwise": False, "schedule.freeze_previous": False,
                                "schedule.full_rank_finish": False}))
    assert len(plan) == 1 and plan[0].n_blocks == 4 and plan[0].frozen_blocks == ()


def test_stage_weights_split_the_growth_budget():
    cfg = config(**{"schedule.stage_weights": "[1, 1, 2, 4]", "schedule.growth_fraction": "null",
                    "train.max_steps": 100,
                    "train.warmup_steps": 10, "schedule.finish_fraction": 0.2})
    steps = [s.steps for s in build_plan(cfg)]
    assert steps[-1] == 20 and sum(steps) == 100
    assert abs(steps[0] - steps[1]) <= 1 and steps[1] < steps[2] < steps[3]


@pytest.mark.parametrize("total, weights", [(10, [1, 1, 1]), (7, [1, 3]), (4, [1, 1, 1, 1]),
                                            (100, [0.1, 5, 2.5]), (13, [1] * 13)])
def test_split_steps_is_exact_and_gives_every_stage_a_step(total, weights):
    parts = split_steps(total, weights)
    assert sum(parts) == total and all(p >= 1 for p in parts) and len(parts) == len(weights)


def test_too_few_steps_for_the_stages_is_a_config_error():
    with pytest.raises(ValueError, match="every stage needs at least one step"):
        config(**{"train.max_steps": 4, "train.warmup_steps": 0})


def test_estimated_flops_follow_structure_and_freezing():
    frozen = build_plan(config())
    unfrozen = build_plan(config(**{"schedule.freeze_previous": False}))
    # Same structure, but frozen blocks skip their weight gradients.
    assert frozen[0].flops_per_token == unfrozen[0].flops_per_token
    assert all(f.flops_per_token < u.flops_per_token for f, u in zip(frozen[1:-1], unfrozen[1:-1]))
    # The realized (dense, exact attention) finish costs more per token than any approximated stage.
    assert frozen[-1].flops_per_token > max(s.flops_per_token for s in frozen[:-1])


def test_plan_table_lists_every_stage_and_the_budget():
    cfg = config()
    plan = build_plan(cfg, world_size=2)
    table = format_plan(plan)
    for s in plan:
        assert s.name in table and f"{s.start_step + 1}-{s.end_step}" in table
    assert f"{sum(s.tokens for s in plan):,}" in table and "realizes every block" in table


def test_cosine_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = config(**{"schedule.lr_schedule": "cosine"})
    plan = build_plan(cfg)
    lrs = [learning_rate(cfg, plan, s) for s in range(1, cfg.train.max_steps + 1)]
    w = cfg.train.warmup_steps
    assert all(a < b for a, b in zip(lrs[:w], lrs[1:w + 1]))
    assert lrs[w] == pytest.approx(cfg.train.learning_rate)
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))
    assert lrs[-1] == pytest.approx(cfg.train.min_lr, rel=1e-3)


def test_new_parameters_warm_up_after_every_stage_boundary():
    cfg = config(**{"schedule.rewarmup_steps": 5})
    plan = build_plan(cfg)
    for stage in plan[1:]:
        first = stage.start_step + 1
        ramp = [new_parameter_warmup(cfg, plan, first + k) for k in range(7)]
        assert ramp == pytest.approx([k / 6 for k in range(1, 6)] + [1.0, 1.0])
    # The first stage has only the run's warm-up; under `stage` every stage warms up by itself.
    assert all(new_parameter_warmup(cfg, plan, s) == 1.0 for s in range(1, plan[0].end_step + 1))
    staged = config(**{"schedule.rewarmup_steps": 5, "schedule.lr_schedule": "stage"})
    assert all(new_parameter_warmup(staged, plan, s) == 1.0 for s in range(1, 401))


def test_wsd_is_constant_until_the_finish_then_decays_linearly_to_min_lr():
    cfg = config(**{"schedule.lr_schedule": "wsd"})
    plan = build_plan(cfg)
    t, finish = cfg.train, plan[-1]
    lrs = [learning_rate(cfg, plan, s) for s in range(1, t.max_steps + 1)]
    assert all(a < b for a, b in zip(lrs[:t.warmup_steps], lrs[1:t.warmup_steps + 1]))
    assert set(lrs[t.warmup_steps:finish.start_step]) == {t.learning_rate}
    decay = lrs[finish.start_step:]
    steps = [a - b for a, b in zip([t.learning_rate] + decay, decay)]
    assert steps == pytest.approx([steps[0]] * len(decay))  # linear, from the peak
    assert decay[-1] == pytest.approx(t.min_lr)
    # Without a finish the same share of the run decays, so a variant and its baseline match.
    no_finish = config(**{"schedule.lr_schedule": "wsd", "schedule.full_rank_finish": False})
    no_finish_plan = build_plan(no_finish)
    assert [learning_rate(no_finish, no_finish_plan, s) for s in range(1, t.max_steps + 1)] == lrs


def test_stage_schedule_warms_up_and_decays_within_every_stage():
    cfg = config(**{"schedule.lr_schedule": "stage", "schedule.rewarmup_steps": 5})
    plan = build_plan(cfg)
    t = cfg.train
    for stage in plan:
        lrs = [learning_rate(cfg, plan, s) for s in range(stage.start_step + 1, stage.end_step + 1)]
        warm = t.warmup_steps if stage.index == 0 else 5
        assert lrs[:warm + 1] == pytest.approx([t.learning_rate * (k + 1) / (warm + 1)
                                                for k in range(warm)] + [t.learning_rate])
        assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
        assert lrs[-1] == pytest.approx(t.min_lr)


@pytest.mark.parametrize("schedule, freeze", [("cosine", True), ("wsd", False), ("stage", True)])
def test_block_budgets_are_exact_sums_over_the_steps_each_block_trains(schedule, freeze):
    cfg = config(**{"schedule.lr_schedule": schedule, "schedule.freeze_previous": freeze})
    plan = build_plan(cfg)
    lr = {s: learning_rate(cfg, plan, s) for s in range(1, cfg.train.max_steps + 1)}
    for b in block_budgets(cfg, plan):
        # Step by step: block b trains at step s when it exists then and is not frozen.
        trained = [s for s in lr if b.index < stage_at(plan, s - 1).n_blocks
                   and b.index not in stage_at(plan, s - 1).frozen_blocks]
        assert b.steps_trained == len(trained)
        assert b.lr_integral == math.fsum(lr[s] for s in trained)
    # The dense baseline: one stage, every block every step, the same schedule family.
    dense = config(**{"schedule.lr_schedule": schedule, "schedule.layerwise": False,
                      "schedule.freeze_previous": False, "schedule.full_rank_finish": False})
    dense_plan = build_plan(dense)
    assert dense_lr_integral(cfg) == math.fsum(learning_rate(dense, dense_plan, s) for s in lr)


def ablation_config(experiment: str, ablation: str | None, *extra: str):
    overrides = yaml.safe_load((ROOT / ablation).read_text())["overrides"] if ablation else []
    return load_config(ROOT / experiment, [*overrides, *extra])


@pytest.mark.parametrize("experiment, ablation", [
    ("configs/experiments/tiny.yaml", None), ("configs/experiments/tiny.yaml", "configs/ablation/tiny.yaml"),
    ("configs/experiments/gpt2-124m.yaml", "configs/ablation/gpt2-124m.yaml")])
def test_growth_gives_every_block_half_the_dense_lr_integral(experiment, ablation):
    """Issue 12's target: with the default schedule, growth without freezing gives every block at
    least half of a dense-baseline block's LR integral (one cosine over equal stages gave the last
    block 3.5 % at the gpt2-124m ablation settings)."""
    cfg = ablation_config(experiment, ablation, "schedule.freeze_previous=false")
    record = plan_record(cfg, build_plan(cfg))
    assert min(b["lr_integral"] for b in record["blocks"]) >= 0.5 * record["dense_lr_integral"]
    if "gpt2" in experiment:
        return  # (the comparison below costs another plan of 13 stages)
    # Equal stages under one cosine is what starved the late blocks.
    old = ablation_config(experiment, ablation, "schedule.freeze_previous=false",
                          "schedule.lr_schedule=cosine", "schedule.growth_fraction=null")
    old_record = plan_record(old, build_plan(old))
    assert min(b["lr_integral"] for b in old_record["blocks"]) < 0.2 * old_record["dense_lr_integral"]
    table = format_budgets(record)
    assert all(f"{b['lr_integral']:.4g}" in table for b in record["blocks"])


def test_new_parameter_names_are_those_of_the_real_model():
    """The optimizer groups' `new` flags come from meta-device models of the plan; they must name
    exactly the real model's parameters that were not trainable in the stage before."""
    cfg = config(**{"model.n_layer": 3, "model.n_embd": 32, "model.n_head": 2,
                    "schedule.freeze_embeddings": True})
    plan = build_plan(cfg)
    model = GPT(cfg.model, n_initial_layers=plan[0].n_blocks)
    apply_stage(model, plan[0], cfg.seed)
    for stage in plan[1:]:
        was = {n for n, p in model.named_parameters() if p.requires_grad}
        apply_stage(model, stage, cfg.seed)
        now = {n for n, p in model.named_parameters() if p.requires_grad}
        assert new_parameter_names(cfg, plan, stage, carried=True) == now - was
        assert new_parameter_names(cfg, plan, stage, carried=False) == now
    assert new_parameter_names(cfg, plan, plan[0], carried=True) == frozenset()
    # Realizing renames every factorised weight, so the finish's dense weights are all new.
    assert any(n.endswith("c_fc.weight") for n in new_parameter_names(cfg, plan, plan[-1], True))


def test_stage_at_maps_steps_to_stages():
    plan = build_plan(config())
    for stage in plan:
        assert stage_at(plan, stage.start_step) is stage
        assert stage_at(plan, stage.end_step - 1) is stage
    assert stage_at(plan, plan[-1].end_step) is plan[-1]
