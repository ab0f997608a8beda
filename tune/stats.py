"""The ablation's statistics: every number the report gives is a linear contrast of variant means
estimated in one paired variant x seed layout.

Every variant runs on the same seeds (same initialisation, same batches), so two variants are compared
within a seed: the model is the two-way layout

    y[variant, seed] = mu[variant] + b[seed] + e,    e ~ N(0, sigma^2)

fit by least squares (so a failed trial only removes its own observation). The error term is the
variant x seed residual, with (V-1)(S-1) degrees of freedom when nothing is missing; confidence
intervals and p-values are Student-t with those degrees of freedom (scipy), and `holm` adjusts the
p-values of every test in one report together. With one seed there is no error term: the report gives
estimates only, with Lenth's pseudo standard error of the factorial effects (a robust scale that
assumes most effects are zero) shown as such, never as a test.

Factorial effects (main effects, interactions, conditional effects) come from a least-squares fit of
the factorial model to the grid's variant means: saturated when every cell of the grid ran (then they
equal the classic balanced contrasts), main effects + two-way interactions otherwise (with a warning
that higher-order interactions are assumed zero), refused when even that is not estimable.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
CONFIDENCE = 1.0 - ALPHA   # two-sided intervals
ONE_SEED = "no effect can be called significant with one seed"
NOT_ALONE = "main effect not interpretable alone; see conditional effects"


@dataclass
class Estimate:
    """A contrast of variant means. `estimate` and `se` are floats, or arrays over simulated draws
    when the layout was fit to many draws at once (see `fit_layout`)."""
    estimate: float
    se: float = math.nan        # standard error; nan without an error term (one seed)
    df: int = 0                 # error degrees of freedom of `se`
    pseudo_se: float | None = None   # one seed: Lenth's pseudo standard error (a scale, not a test)
    note: str = ""              # why the estimate is missing, when it is
    p_holm: float | None = None  # set by `holm` over the report's family of tests
    weights: dict[str, float] = field(default_factory=dict, repr=False)  # the contrast itself

    @property
    def defined(self) -> bool:
        return not np.any(np.isnan(self.estimate))

    @property
    def tested(self) -> bool:
        return self.defined and self.df > 0 and not np.any(np.isnan(self.se))

    @property
    def half_width(self) -> float | None:
        return sps.t.ppf(1 - ALPHA / 2, self.df) * self.se if self.tested else None

    @property
    def ci(self) -> tuple[float | None, float | None]:
        h = self.half_width
        return (None, None) if h is None else (self.estimate - h, self.estimate + h)

    @property
    def p(self) -> float | None:
        if not self.tested:
            return None
        if self.se == 0.0:
            return 0.0 if self.estimate != 0.0 else 1.0
        return float(2 * sps.t.sf(abs(self.estimate / self.se), self.df))

    @property
    def significant(self) -> bool | None:
        return None if self.p_holm is None else self.p_holm < ALPHA

    def to_json(self) -> dict:
        lo, hi = self.ci
        out = {"estimate": _num(self.estimate), "ci_low": _num(lo), "ci_high": _num(hi),
               "se": _num(self.se), "df": self.df, "p": _num(self.p), "p_holm": _num(self.p_holm),
               "significant": self.significant}
        if self.pseudo_se is not None:
            out["pseudo_se"] = _num(self.pseudo_se)
        if self.note:
            out["note"] = self.note
        return out


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def missing(note: str) -> Estimate:
    return Estimate(math.nan, note=note)


@dataclass
class Layout:
    """The least-squares fit of the paired variant x seed layout for one metric."""
    variants: list[str]          # variants with at least one observation, in input order
    seeds: list[int]
    beta: np.ndarray             # [mu per variant, seed effects (effects-coded, S-1)]
    cov: np.ndarray              # Cov(beta) / sigma^2
    proj: np.ndarray             # projection onto D's row space: which contrasts are estimable
    sigma: float                 # residual std; nan with no residual degrees of freedom
    df: int
    n: dict[str, int]            # observations per variant
    balanced: bool               # every variant has every seed
    pseudo_sigma: float | None = None   # one seed: per-run sigma implied by Lenth's pseudo-SE

    @property
    def mu(self) -> dict[str, float]:
        return {v: float(self.beta[i]) for i, v in enumerate(self.variants)}


def fit_layout(observations: list[tuple[str, int, float]], draws: np.ndarray | None = None) -> Layout:
    """observations: (variant, seed, value) of every finished trial. `draws` (observations x R)
    replaces the values by R simulated draws fit at once (the coverage test): beta and sigma then
    carry a trailing draw axis."""
    variants = list(dict.fromkeys(v for v, _, _ in observations))
    seeds = sorted({s for _, s, _ in observations})
    V, S = len(variants), len(seeds)
    D = np.zeros((len(observations), V + S - 1))
    y = np.empty(len(observations))
    for row, (v, s, value) in enumerate(observations):
        D[row, variants.index(v)] = 1.0
        j = seeds.index(s)
        # Effects coding (seed effects sum to zero) makes mu[v] the variant's mean over the seeds.
        if j < S - 1:
            D[row, V + j] = 1.0
        else:
            D[row, V:] = -1.0
        y[row] = value
    if draws is not None:
        y = np.asarray(draws, dtype=float)
    pinv = np.linalg.pinv(D)
    beta = pinv @ y
    rank = int(np.linalg.matrix_rank(D)) if len(y) else 0
    df = len(y) - rank
    rss = np.sum((y - D @ beta) ** 2, axis=0)
    sigma = np.sqrt(rss / df) if df > 0 else np.full(np.shape(rss), math.nan)
    n = {v: sum(1 for o in observations if o[0] == v) for v in variants}
    return Layout(variants, seeds, beta, pinv @ pinv.T, pinv @ D,
                  float(sigma) if np.ndim(sigma) == 0 else sigma, df, n,
                  balanced=all(c == S for c in n.values()))


def contrast(layout: Layout, weights: dict[str, float]) -> Estimate:
    """sum_v weights[v] * mu[v], with its standard error from the layout's residual."""
    c = np.zeros(len(layout.beta))
    for v, w in weights.items():
        if w == 0.0:
            continue
        if v not in layout.variants:
            return missing(f"no finished trial of {v}")
        c[layout.variants.index(v)] = w
    if np.abs(c @ layout.proj - c).max(initial=0.0) > 1e-8:
        return missing("not estimable from the finished trials")
    unit = math.sqrt(max(float(c @ layout.cov @ c), 0.0))
    value = c @ layout.beta
    return Estimate(float(value) if np.ndim(value) == 0 else value, layout.sigma * unit, layout.df,
                    pseudo_se=None if layout.pseudo_sigma is None else layout.pseudo_sigma * unit,
                    weights={v: w for v, w in weights.items() if w != 0.0})


def holm(estimates: list[Estimate]) -> int:
    """Holm's step-down adjustment over every tested estimate (sets p_holm); returns the family size."""
    tested = [e for e in estimates if e.p is not None]
    m = len(tested)
    running = 0.0
    for rank, e in enumerate(sorted(tested, key=lambda e: e.p)):
        running = max(running, min(1.0, (m - rank) * e.p))
        e.p_holm = running
    return m


def lenth_pse(effects: np.ndarray) -> float:
    """Lenth's (1989) pseudo standard error of factorial effects, most of which are assumed zero."""
    a = np.abs(np.asarray(effects, dtype=float))
    s0 = 1.5 * np.median(a)
    trimmed = a[a < 2.5 * s0]
    return float(1.5 * np.median(trimmed)) if trimmed.size else float(s0)


# ------------------------------------------------------------------ the factorial model


@dataclass
class Factorial:
    axes: list[str]                          # the free axes
    cells: list[str]                         # grid variants in the fit
    terms: list[tuple[str, ...]]             # () is the intercept
    M: np.ndarray                            # coefficients = M @ (cell means), in +-1 coding
    complete: bool
    warning: str = ""

    def effect(self, subset: tuple[str, ...], scale: float = 2.0) -> dict[str, float] | None:
        """Weights over cells of `scale` x the coefficient of `subset` (2 x coef = a main effect as
        mean(on) - mean(off); for a pair, half the change of one's effect when the other is on)."""
        if subset not in self.terms:
            return None
        row = self.M[self.terms.index(subset)]
        return {cell: scale * float(w) for cell, w in zip(self.cells, row)}


def fit_factorial(grid: dict[str, dict[str, bool]], axes: list[str], available: set[str]) -> Factorial:
    """grid: the factorial's variants -> their free-axis states; available: variants with a mean."""
    cells = [name for name in grid if name in available]
    missing_cells = [name for name in grid if name not in available]
    k = len(axes)
    full = len({tuple(grid[c][a] for a in axes) for c in cells}) == 2 ** k == len(cells)
    order = range(0, k + 1) if full else range(0, min(k, 2) + 1)
    terms = [t for r in order for t in itertools.combinations(axes, r)]
    X = np.array([[math.prod(1.0 if grid[c][a] else -1.0 for a in t) for t in terms] for c in cells])
    if full:
        return Factorial(axes, cells, terms, np.linalg.pinv(X), True)
    why = (f"the factorial is incomplete ({len(cells)} of {2 ** k} cells"
           + (f"; missing: {', '.join(missing_cells)}" if missing_cells else "") + ")")
    if len(cells) < len(terms) or np.linalg.matrix_rank(X) < len(terms):
        return Factorial(axes, cells, [], np.zeros((0, len(cells))), False,
                         f"{why}: too few cells to estimate main effects and two-way interactions; "
                         "factorial effects are refused (simple effects and the frontier stand)")
    return Factorial(axes, cells, terms, np.linalg.pinv(X), False,
                     f"{why}: main effects and two-way interactions are a least-squares fit that "
                     "assumes every higher-order interaction is zero")


def lenth_sigma(layout: Layout, factorial: Factorial) -> float | None:
    """One seed, complete grid of >= 2 axes: the per-run sigma implied by Lenth's pseudo-SE of the
    2^k - 1 factorial effects (var of an effect = 4 sigma^2 / 2^k)."""
    if layout.df > 0 or not factorial.complete or len(factorial.axes) < 2:
        return None
    mu = layout.mu
    effects = [sum(w * mu[c] for c, w in factorial.effect(t).items()) for t in factorial.terms if t]
    return lenth_pse(np.array(effects)) * math.sqrt(len(factorial.cells)) / 2.0


@dataclass
class AxisEffects:
    simple: Estimate                   # at the control
    main: Estimate
    leave_one_out: Estimate            # at the operating point
    conditional: dict[str, tuple[Estimate, Estimate]] = field(default_factory=dict)  # other -> (off, on)
    largest_interaction: float = math.nan

    @property
    def interaction_dominated(self) -> bool | None:
        if not self.main.defined or math.isnan(self.largest_interaction):
            return None
        return self.largest_interaction >= abs(self.main.estimate)


def pair_name(axes: list[str], x: str, y: str) -> str:
    a, b = sorted((x, y), key=axes.index)
    return f"{a} x {b}"


def toggle(layout: Layout, grid: dict[str, dict[str, bool]], at: str | None, axis: str) -> Estimate:
    """mu(at with `axis` on) - mu(at with `axis` off): the effect of switching one axis in one real
    configuration (a simple effect at the control; leave-one-out at the operating point)."""
    if at is None or at not in grid:
        return missing("no such variant in the grid")
    state = grid[at]
    on = {**state, axis: True}
    off = {**state, axis: False}
    by_state = {tuple(sorted(s.items())): name for name, s in grid.items()}
    names = [by_state.get(tuple(sorted(x.items()))) for x in (on, off)]
    if None in names:
        return missing(f"the grid has no variant with {axis} {'off' if state[axis] else 'on'} "
                       f"next to {at} (dropped by `requires`?)")
    return contrast(layout, {names[0]: 1.0, names[1]: -1.0})


def axis_effects(layout: Layout, factorial: Factorial, grid: dict[str, dict[str, bool]],
                 control: str | None, operating_point: str | None
                 ) -> tuple[dict[str, AxisEffects], dict[str, Estimate]]:
    """Per free axis: simple, main, leave-one-out and conditional effects; and the two-way interactions."""
    refused = factorial.warning if not factorial.terms else "factorial effects refused"

    def factorial_estimate(weights: dict[str, float] | None) -> Estimate:
        return missing(refused) if weights is None else contrast(layout, weights)

    pairs = {pair_name(factorial.axes, a, b): factorial_estimate(factorial.effect((a, b)))
             for a, b in itertools.combinations(factorial.axes, 2)}
    out = {}
    for axis in factorial.axes:
        main_w = factorial.effect((axis,))
        effects = AxisEffects(simple=toggle(layout, grid, control, axis),
                              main=factorial_estimate(main_w),
                              leave_one_out=toggle(layout, grid, operating_point, axis))
        sizes = []
        for other in factorial.axes:
            if other == axis:
                continue
            pair_w = factorial.effect(tuple(sorted((axis, other), key=factorial.axes.index)))
            if main_w is None or pair_w is None:
                effects.conditional[other] = (missing(refused), missing(refused))
                continue
            # effect of `axis` with `other` off / on = main -/+ interaction (both in difference units)
            cells = set(main_w) | set(pair_w)
            off = {c: main_w.get(c, 0.0) - pair_w.get(c, 0.0) for c in cells}
            on = {c: main_w.get(c, 0.0) + pair_w.get(c, 0.0) for c in cells}
            effects.conditional[other] = (contrast(layout, off), contrast(layout, on))
            sizes.append(abs(pairs[pair_name(factorial.axes, axis, other)].estimate))
        effects.largest_interaction = max(sizes) if sizes else math.nan
        out[axis] = effects
    return out, pairs
