"""The numbers in the ablation report, as pure functions of the results table.

The grid is a two-level factorial design (each approximation on or off), so the classic design-of-
experiments estimates apply:

* main effect of an axis: mean val loss of the variants with it on minus the mean with it off;
* two-way interaction of axes a, b: half of (y11 - y10 - y01 + y00), cell means over the other axes
  -- how much switching a on changes the effect of b;
* leave-one-out: the all-on variant versus the all-on variant with one approximation removed.

"Within seed noise" compares an effect with twice its standard error. The per-run noise sigma comes
from repeated seeds (pooled within-variant std) when there are any; with one seed it is estimated
from the three-way and higher interactions of a complete factorial, which are ~0 for real effects and
so measure noise (Daniel's method).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

OK = "ok"


@dataclass
class VariantStats:
    name: str
    axes: dict[str, bool]
    baseline: bool
    n: int                       # finished seeds
    loss_mean: float
    loss_std: float              # sample std over seeds (nan with one seed)
    before_finish_mean: float
    flops_mean: float
    tokens_per_s_mean: float
    wall_time_mean: float
    total_params: float
    peak_trainable_params: float
    peak_memory_bytes: float


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def variant_stats(rows: list[dict], axes: list[str]) -> list[VariantStats]:
    """Aggregate finished trials (status ok) per variant, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == OK and row["final_val_loss"] is not None:
            groups.setdefault(row["variant"], []).append(row)
    out = []
    for name, group in groups.items():
        losses = [r["final_val_loss"] for r in group]
        out.append(VariantStats(
            name=name,
            axes={a: bool(group[0]["axes"][a]) for a in axes},
            baseline=bool(group[0]["baseline"]),
            n=len(group),
            loss_mean=float(np.mean(losses)),
            loss_std=float(np.std(losses, ddof=1)) if len(losses) > 1 else math.nan,
            before_finish_mean=_mean([r["val_loss_before_finish"] for r in group]),
            flops_mean=_mean([r["training_flops"] for r in group]),
            tokens_per_s_mean=_mean([r["tokens_per_s"] for r in group]),
            wall_time_mean=_mean([r["wall_time_s"] for r in group]),
            total_params=_mean([r["total_params"] for r in group]),
            peak_trainable_params=_mean([r["peak_trainable_params"] for r in group]),
            peak_memory_bytes=_mean([r["peak_memory_bytes"] for r in group]),
        ))
    return out


def _factorial(stats: list[VariantStats]) -> list[VariantStats]:
    # Effects are estimated over the grid variants only; the dense baseline sits outside the
    # factorial when some axes are fixed on (it also switches those off).
    return [s for s in stats if not s.baseline] or stats


def _cell(stats: list[VariantStats], **state: bool) -> list[VariantStats]:
    return [s for s in stats if all(s.axes[a] == v for a, v in state.items())]


def contrast_effect(stats: list[VariantStats], subset: tuple[str, ...]) -> float:
    """The factorial effect of `subset` (one axis: main effect; k axes: k-way interaction).

    (2 / N) * sum of y * prod(+1 on / -1 off); equals mean(on) - mean(off) for one axis."""
    signs = [math.prod(1 if s.axes[a] else -1 for a in subset) for s in stats]
    return 2.0 / len(stats) * sum(sign * s.loss_mean for sign, s in zip(signs, stats))


def is_complete(stats: list[VariantStats], axes: list[str]) -> bool:
    seen = {tuple(s.axes[a] for a in axes) for s in stats}
    return len(seen) == 2 ** len(axes) == len(stats)


@dataclass
class Noise:
    sigma: float   # per-run std of the final val loss; nan when it cannot be estimated
    source: str


def noise_sigma(stats: list[VariantStats], axes: list[str]) -> Noise:
    """Per-run noise: pooled seed std if seeds repeat, else from >= 3-way interactions."""
    repeated = [s for s in stats if s.n > 1]
    if repeated:
        dof = sum(s.n - 1 for s in repeated)
        pooled = sum((s.n - 1) * s.loss_std ** 2 for s in repeated) / dof
        return Noise(math.sqrt(pooled), f"pooled std over seeds ({dof} degrees of freedom)")
    grid = _factorial(stats)
    high = [subset for k in range(3, len(axes) + 1) for subset in itertools.combinations(axes, k)]
    if high and is_complete(grid, axes):
        # Each factorial effect has variance 4 sigma^2 / N; the high-order ones are noise only.
        effects = [contrast_effect(grid, subset) for subset in high]
        sigma_effect = math.sqrt(sum(e * e for e in effects) / len(effects))
        return Noise(sigma_effect * math.sqrt(len(grid)) / 2.0,
                     f"one seed: estimated from the {len(high)} interactions of 3+ axes")
    return Noise(math.nan, "unknown (one seed and too few axes to estimate it)")


@dataclass
class Effect:
    name: str              # axis name, or "a x b"
    d_loss: float          # change in val loss when switched on (negative: better)
    se: float              # standard error of d_loss (nan if noise unknown)
    d_flops_rel: float     # relative change in training FLOPs when switched on (-0.3: 30% fewer)

    @property
    def within_noise(self) -> bool | None:
        if math.isnan(self.se) or math.isnan(self.d_loss):
            return None
        return abs(self.d_loss) < 2.0 * self.se


def _runs(group: list[VariantStats]) -> int:
    return sum(s.n for s in group)


def main_effects(stats: list[VariantStats], axes: list[str], noise: Noise) -> list[Effect]:
    grid = _factorial(stats)
    out = []
    for axis in axes:
        on, off = _cell(grid, **{axis: True}), _cell(grid, **{axis: False})
        if not on or not off:
            out.append(Effect(axis, math.nan, math.nan, math.nan))
            continue
        d_loss = _mean([s.loss_mean for s in on]) - _mean([s.loss_mean for s in off])
        flops_off = _mean([s.flops_mean for s in off])
        d_flops = (_mean([s.flops_mean for s in on]) - flops_off) / flops_off if flops_off else math.nan
        # Variant means over seeds are averaged with equal weight, so each cell mean's variance is
        # sigma^2 / (variants^2) * sum(1 / n_seeds).
        se = noise.sigma * math.sqrt(sum(1 / s.n for s in on) / len(on) ** 2
                                     + sum(1 / s.n for s in off) / len(off) ** 2)
        out.append(Effect(axis, d_loss, se, d_flops))
    return out


def leave_one_out(stats: list[VariantStats], axes: list[str], noise: Noise) -> tuple[str | None, list[Effect]]:
    """For each axis: (all-on) minus (all-on without it): what keeping that approximation costs.

    Returns the all-on variant's name and one Effect per axis (nan where a variant is missing)."""
    grid = _factorial(stats)
    top = _cell(grid, **{a: True for a in axes})
    if not top:
        return None, []
    full = top[0]
    out = []
    for axis in axes:
        without = _cell(grid, **{a: (a != axis) for a in axes})
        if not without:
            out.append(Effect(axis, math.nan, math.nan, math.nan))
            continue
        other = without[0]
        d_flops = (full.flops_mean - other.flops_mean) / other.flops_mean if other.flops_mean else math.nan
        se = noise.sigma * math.sqrt(1 / full.n + 1 / other.n)
        out.append(Effect(axis, full.loss_mean - other.loss_mean, se, d_flops))
    return full.name, out


def interactions(stats: list[VariantStats], axes: list[str], noise: Noise) -> list[Effect]:
    grid = _factorial(stats)
    out = []
    for a, b in itertools.combinations(axes, 2):
        cells = {(va, vb): _cell(grid, **{a: va, b: vb}) for va in (True, False) for vb in (True, False)}
        if not all(cells.values()):
            out.append(Effect(f"{a} x {b}", math.nan, math.nan, math.nan))
            continue
        y = {k: _mean([s.loss_mean for s in v]) for k, v in cells.items()}
        f = {k: _mean([s.flops_mean for s in v]) for k, v in cells.items()}
        d_loss = (y[True, True] - y[True, False] - y[False, True] + y[False, False]) / 2.0
        d_flops = ((f[True, True] - f[True, False] - f[False, True] + f[False, False]) / 2.0
                   / f[False, False]) if f[False, False] else math.nan
        se = noise.sigma / 2.0 * math.sqrt(sum(sum(1 / s.n for s in v) / len(v) ** 2
                                               for v in cells.values()))
        out.append(Effect(f"{a} x {b}", d_loss, se, d_flops))
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (flops, loss), both minimised; sorted by flops."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_loss = [], math.inf
    for i in order:
        flops, loss = points[i]
        if math.isnan(flops) or math.isnan(loss):
            continue
        if loss < best_loss:
            front.append(i)
            best_loss = loss
    return front


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the empirical token distribution: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens).ravel().astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
