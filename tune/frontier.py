"""The dense compute frontier: the dense baseline trained at several budgets, and how each variant
compares with it at equal FLOPs.

    frontier:
      budgets: [0.25, 0.5, 0.75]    # fractions of the dense baseline's steps (= its training FLOPs)

Each budget is its own trial (`dense@0.5`, same seeds) with every step count of the schedule scaled,
so it ends its own complete warm-up + cosine decay: a checkpoint halfway through the long run would
still sit at a high learning rate and understate what the dense model reaches with half the compute.

The frontier is the dense points' mean loss interpolated linearly in log FLOPs. For a variant at
FLOPs x with loss y:
  * loss gap    = y - frontier(x)                        (< 0: better than dense at equal compute)
  * multiplier  = x* / x, where frontier(x*) = y         (> 1: the approximation pays off)
Both are linear (the gap) or monotone (x*) in the variant means, so their confidence intervals come
from the same paired variant x seed layout as every other estimate (tune/stats.py). Neither is
extrapolated beyond the frontier's FLOPs or loss range: the report says "outside the frontier".
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class FrontierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # [] trains no frontier (the report then cannot say whether a variant pays off at equal FLOPs).
    budgets: list[float] = Field(default=[0.25, 0.5, 0.75])

    @field_validator("budgets")
    @classmethod
    def _fractions(cls, budgets: list[float]) -> list[float]:
        for b in budgets:
            if not 0.0 < b < 1.0:
                raise ValueError(f"frontier.budgets: {b} is not a fraction of the dense budget; "
                                 "valid: 0 < budget < 1 (the full budget is the dense baseline)")
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"frontier.budgets: {budgets} has duplicates")
        return sorted(budgets)


def frontier_name(baseline: str, budget: float) -> str:
    return f"{baseline}@{budget:g}"


def scaled_train_overrides(train, budget: float, source: str) -> list[str]:
    """The dotted overrides that shrink a run to `budget` of its steps: max_steps (and so the cosine
    decay's length) and the warm-up in proportion; evaluation keeps its interval (the last step is
    always evaluated)."""
    from distributed.config import ConfigError

    steps = round(train.max_steps * budget)
    if steps < 1:
        raise ConfigError(f"{source}: frontier budget {budget} of train.max_steps={train.max_steps} "
                          "is less than one step; valid: a larger budget or more steps")
    return [f"train.max_steps={steps}",
            f"train.warmup_steps={min(round(train.warmup_steps * budget), steps - 1)}"]
