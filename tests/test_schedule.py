"""The stage plan and the LR schedule: pure functions of the config."""
import itertools
from pathlib import Path

import pytest

from distributed.config import load_config
from distributed.schedule import (build_plan, format_plan, learning_rate, split_steps, stage_at,
                                  tokens_per_step)

TINY = Path(__file__).resolve().parents[1] / "configs/experiments/tiny.yaml"

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
    cfg = config(**{"schedule.stage_weights": "[1, 1, 2, 4]", "train.max_steps": 100,
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


def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = config(**{"schedule.rewarmup_steps": 0})
    plan = build_plan(cfg)
    lrs = [learning_rate(cfg, plan, s) for s in range(1, cfg.train.max_steps + 1)]
    w = cfg.train.warmup_steps
    assert all(a < b for a, b in zip(lrs[:w], lrs[1:w + 1]))
    assert lrs[w] == pytest.approx(cfg.train.learning_rate)
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))
    assert lrs[-1] == pytest.approx(cfg.train.min_lr, rel=1e-3)


def test_rewarmup_ramps_the_lr_after_every_stage_boundary():
    cfg = config(**{"schedule.rewarmup_steps": 5})
    base_cfg = config(**{"schedule.rewarmup_steps": 0})
    plan = build_plan(cfg)
    for stage in plan[1:]:
        first = stage.start_step + 1
        ramp = [learning_rate(cfg, plan, first + k) / learning_rate(base_cfg, plan, first + k)
                for k in range(7)]
        assert ramp[:5] == pytest.approx([k / 6 for k in range(1, 6)])
        assert ramp[5:] == pytest.approx([1.0, 1.0])
    # The first stage has only the run's warm-up.
    assert learning_rate(cfg, plan, 30) == learning_rate(base_cfg, plan, 30)


def test_stage_at_maps_steps_to_stages():
    plan = build_plan(config())
    for stage in plan:
        assert stage_at(plan, stage.start_step) is stage
        assert stage_at(plan, stage.end_step - 1) is stage
    assert stage_at(plan, plan[-1].end_step) is plan[-1]
