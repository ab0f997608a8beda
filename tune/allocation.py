"""Pure functions behind the rank search's answers: seed statistics and the budgeted allocation of
ranks across approximation sites (the dense frontier is tune/frontier.py's, shared with the ablation
report).

The allocation problem: every site s has options o = (knob, cost delta c_o, loss delta d_o) measured
by its sweep (site alone, everything else dense; dense itself is the option (None, 0, 0)). Assuming
the sites' effects add up (their FLOPs do exactly, by the accounting; their losses only roughly, which
is why every allocation is then trained and measured), choose one option per site to

    minimise  sum_s d_s    subject to    base_cost + sum_s c_s <= budget.

Greedy marginal analysis solves the convex relaxation: on each site's lower convex hull of (c, d),
start from the cheapest-in-loss end and repeatedly take the hull step that saves FLOPs at the
smallest loss increase per FLOP, until the budget is met. At the end every site sits where its
marginal Δloss/ΔFLOP is about equal (the last step taken sets the rate), the condition for an optimum
of separable convex problems. A last pass spends any FLOPs the final step over-saved on the best
single-site upgrade that still fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and its t-based confidence interval over seeds; (mean, None, None) with one value."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, None, None
    mean = float(np.mean(xs))
    if len(xs) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs)))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Option:
    knob: int | None     # the swept setting (rank, r for r1 = r2, slots); None: the site stays dense
    cost: float          # training-FLOPs delta against the dense model (negative: a saving)
    loss: float          # predicted loss delta against the dense model


def lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (cost, loss) that are not dominated (a costlier
    option must have a lower loss), ordered from the cheapest to the costliest."""
    pts = sorted(options, key=lambda o: (o.cost, o.loss))
    hull: list[Option] = []
    for p in pts:
        if hull and p.loss >= hull[-1].loss:    # costlier and no better: dominated
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> p: not on the lower hull
            if (b.loss - a.loss) * (p.cost - a.cost) >= (p.loss - a.loss) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(curves: dict[str, list[Option]], budget_delta: float) -> dict[str, Option] | None:
    """One option per site minimising the summed loss delta with summed cost <= budget_delta (a
    cost delta against dense, so negative: the FLOPs to save). None when even the cheapest options
    do not fit."""
    hulls = {s: lower_hull(opts) for s, opts in curves.items()}
    if any(not h for h in hulls.values()):
        raise ValueError("every site needs at least one option")
    at = {s: len(h) - 1 for s, h in hulls.items()}   # start at the lowest-loss end of each hull

    def total() -> float:
        return sum(hulls[s][i].cost for s, i in at.items())

    while total() > budget_delta:
        steps = []
        for s, i in at.items():
            if i > 0:
                here, down = hulls[s][i], hulls[s][i - 1]
                steps.append(((down.loss - here.loss) / (here.cost - down.cost), s))
        if not steps:
            return None
        _, site = min(steps)
        at[site] -= 1
    chosen = {s: hulls[s][i] for s, i in at.items()}
    # Spend what the last step over-saved: the best single-site change (any measured option) that
    # lowers the loss and still fits, repeated while one exists.
    while True:
        spent = sum(o.cost for o in chosen.values())
        best = None
        for s, opts in curves.items():
            for o in opts:
                gain = chosen[s].loss - o.loss
                if gain > 1e-12 and spent - chosen[s].cost + o.cost <= budget_delta \
                        and (best is None or gain > best[0]):
                    best = (gain, s, o)
        if best is None:
            return chosen
        chosen[best[1]] = best[2]
