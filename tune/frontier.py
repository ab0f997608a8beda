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
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import stats as sps

from tune.stats import ALPHA, Estimate, Layout, contrast, missing


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


# ------------------------------------------------------------------ analysis

# Grid over log FLOPs on which the multiplier's confidence set is found (test inversion) and the
# plot's band is drawn.
GRID = 400
REL_TOL = 1e-9


@dataclass
class Frontier:
    names: list[str]          # the frontier's variants (dense points), ascending FLOPs
    log_x: np.ndarray         # their log FLOPs
    loss: np.ndarray          # their mean losses

    def weights(self, x: float) -> dict[str, float] | None:
        """Interpolation weights over the frontier's variants at FLOPs x (None outside its range)."""
        lx = math.log(x)
        lo, hi = self.log_x[0], self.log_x[-1]
        if lx < lo - REL_TOL * abs(lo) or lx > hi + REL_TOL * abs(hi):
            return None
        lx = min(max(lx, lo), hi)
        j = min(int(np.searchsorted(self.log_x, lx, side="right")) - 1, len(self.names) - 2)
        t = (lx - self.log_x[j]) / (self.log_x[j + 1] - self.log_x[j])
        return {self.names[j]: 1.0 - t, self.names[j + 1]: t}

    def reach(self, loss: float) -> tuple[float | None, str | None]:
        """The least FLOPs at which the interpolated frontier reaches `loss`, or (None, why)."""
        L, tol = self.loss, REL_TOL * max(1.0, abs(loss))
        if loss >= L[0] - tol:
            return (math.exp(self.log_x[0]), None) if loss <= L[0] + tol else (None, "above")
        for j in range(len(L) - 1):
            if L[j + 1] <= loss + tol:
                t = (L[j] - loss) / (L[j] - L[j + 1])
                return math.exp(self.log_x[j] + t * (self.log_x[j + 1] - self.log_x[j])), None
        return None, "below"


def frontier_of_means(points: dict[str, tuple[float, float]]) -> Frontier | None:
    """The frontier through dense points {name: (FLOPs, mean loss)}: None unless at least two
    have distinct positive FLOPs (and no two share FLOPs)."""
    pts = sorted((x, n, loss) for n, (x, loss) in points.items()
                 if x and x > 0 and loss is not None and math.isfinite(loss))
    if len({x for x, _, _ in pts}) < 2 or len({x for x, _, _ in pts}) != len(pts):
        return None
    return Frontier([n for _, n, _ in pts], np.log([x for x, _, _ in pts]),
                    np.array([loss for _, _, loss in pts]))


def build_frontier(layout: Layout, flops: dict[str, float], names: list[str]) -> Frontier | None:
    """The frontier from the dense points that finished (at least two distinct FLOPs needed)."""
    mu = layout.mu
    return frontier_of_means({n: (flops[n], mu[n]) for n in names if n in mu and flops.get(n)})


def compute_multiplier(frontier: Frontier, loss: float, x: float) -> float | None:
    """FLOPs the dense frontier needs to reach `loss`, divided by `x` (> 1: the run at FLOPs x
    pays off); None outside the frontier's loss range (no extrapolation)."""
    reached, _ = frontier.reach(loss)
    return None if reached is None else reached / x


def outside_frontier(frontier: Frontier, loss: float, x: float) -> tuple[str | None, float | None]:
    """Where a loss the frontier does not reach lies, and the bound that still holds for the
    multiplier of a run at FLOPs x: "below" the frontier's best loss, the multiplier exceeds
    (largest dense FLOPs ÷ x); "above" its worst, it is under (smallest dense FLOPs ÷ x).
    (None, None) when the frontier reaches the loss."""
    reached, outside = frontier.reach(loss)
    if reached is not None:
        return None, None
    edge = math.exp(frontier.log_x[-1] if outside == "below" else frontier.log_x[0])
    return outside, edge / x


@dataclass
class FrontierPoint:
    flops: float
    loss_mean: float
    frontier_loss: float | None
    gap: Estimate                     # loss - frontier loss at equal FLOPs
    multiplier: float | None          # None outside the frontier
    multiplier_ci: tuple[float | None, float | None]
    outside: str | None               # "flops": FLOPs beyond the frontier's; "above"/"below": loss
    bound: float | None = None        # outside by loss: the multiplier is below / above this

    def to_json(self) -> dict:
        return {"flops": self.flops, "loss_mean": self.loss_mean, "frontier_loss": self.frontier_loss,
                "loss_gap": self.gap.to_json()["estimate"], "loss_gap_ci": list(self.gap.ci),
                "loss_gap_p_holm": self.gap.p_holm, "loss_gap_significant": self.gap.significant,
                "compute_multiplier": self.multiplier,
                "compute_multiplier_ci": list(self.multiplier_ci),
                "outside": self.outside, "multiplier_bound": self.bound}


def _confidence_set(layout: Layout, frontier: Frontier, variant: str, x_variant: float,
                    ) -> tuple[float | None, float | None]:
    """The FLOPs x at which a paired t-test does not reject 'frontier(x) = the variant's loss',
    as multipliers x / x_variant; an end at the frontier's edge is open (None)."""
    if layout.df <= 0:
        return None, None
    lx = np.linspace(frontier.log_x[0], frontier.log_x[-1], GRID)
    lx = np.union1d(lx, frontier.log_x)
    # Interpolation weight matrix (grid x frontier points), then the contrast variant - frontier(x)
    # for every grid point at once.
    W = np.zeros((lx.size, len(frontier.names)))
    j = np.clip(np.searchsorted(frontier.log_x, lx, side="right") - 1, 0, len(frontier.names) - 2)
    t = (lx - frontier.log_x[j]) / (frontier.log_x[j + 1] - frontier.log_x[j])
    W[np.arange(lx.size), j], W[np.arange(lx.size), j + 1] = 1.0 - t, t
    idx = [layout.variants.index(n) for n in frontier.names]
    C = np.zeros((lx.size, len(layout.beta)))
    C[:, idx] -= W
    C[:, layout.variants.index(variant)] += 1.0
    d = C @ layout.beta
    se = layout.sigma * np.sqrt(np.maximum(np.einsum("gi,ij,gj->g", C, layout.cov, C), 0.0))
    accept = np.abs(d) <= sps.t.ppf(1 - ALPHA / 2, layout.df) * se
    if not accept.any():
        return None, None
    inside = np.flatnonzero(accept)
    lo = None if inside[0] == 0 else math.exp(lx[inside[0]]) / x_variant
    hi = None if inside[-1] == lx.size - 1 else math.exp(lx[inside[-1]]) / x_variant
    return lo, hi


def compare(layout: Layout, frontier: Frontier | None, variant: str, x: float) -> FrontierPoint:
    """One variant (or frontier point) against the frontier at its FLOPs x."""
    loss = layout.mu[variant]
    if frontier is None:
        return FrontierPoint(x, loss, None, missing("no frontier"), None, (None, None), "flops")
    weights = frontier.weights(x)
    if weights is None:
        gap, frontier_loss = missing("FLOPs outside the frontier"), None
    else:
        w = dict(weights)
        w[variant] = w.get(variant, 0.0) - 1.0
        gap = contrast(layout, {n: -v for n, v in w.items()})
        frontier_loss = float(sum(v * layout.mu[n] for n, v in weights.items()))
    outside, bound = outside_frontier(frontier, loss, x)
    if outside is not None:
        return FrontierPoint(x, loss, frontier_loss, gap, None, (None, None), outside, bound)
    return FrontierPoint(x, loss, frontier_loss, gap, compute_multiplier(frontier, loss, x),
                         _confidence_set(layout, frontier, variant, x), None)


def band(layout: Layout, frontier: Frontier, points: int = 100) -> tuple[np.ndarray, ...]:
    """FLOPs, frontier loss and its CI half-width (nan with one seed) along the frontier, for plots."""
    lx = np.linspace(frontier.log_x[0], frontier.log_x[-1], points)
    mean, half = [], []
    for x in np.exp(lx):
        e = contrast(layout, frontier.weights(float(x)))
        mean.append(e.estimate)
        half.append(e.half_width if e.half_width is not None else math.nan)
    return np.exp(lx), np.array(mean), np.array(half)
