"""The ablation report, rebuilt from an experiment directory's logged results alone.

    python -m tune.report runs/ablation-tiny

writes results.csv, report.md, its machine-readable twin report.json, pareto.png, effects.png and
curves.png into the directory and prints the cell table. Nothing here needs Ray or the model: the
inputs are experiment.json, each trial's trial.json and the trainer's metrics.jsonl.

What the report answers, in order: the cells (every real configuration, with its loss gap and compute
multiplier against the dense frontier), the simple effect of each approximation against a named
control configuration, conditional effects, and only then factorial main effects and interactions,
flagged where an interaction is as large as the main effect. The statistics are in tune/stats.py, the
frontier in tune/frontier.py; every number is computed at three metric points (METRIC_POINTS).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tune import analysis, frontier as frontier_mod, stats  # noqa: E402
from tune.results import (EXPERIMENT_JSON, METRIC_POINTS, OK, RESULTS_CSV, TRIALS, collect,  # noqa: E402
                          evaluations, read_experiment, read_json, read_metrics, write_csv,
                          write_json_atomic)

REPORT_JSON = "report.json"
PRIMARY = "final"

# The dense baseline must end this far below the unigram entropy for the comparison to mean
# something (a model that only learned token frequencies sits at the entropy).
TARGET_BELOW_ENTROPY = 0.25

QUESTIONS = {
    "final": "After realizing and the dense finish (equal tokens for every variant): is the "
             "approximated route to a dense model worth its FLOPs against training dense directly?",
    "before_finish": "The approximated model itself, just before it is realized: what does it reach "
                     "with the FLOPs spent so far (the model you would keep without a finish)?",
    "realized": "Right after realizing (before any dense training): how good a dense starting point "
                "did the approximated training produce for the FLOPs spent so far?",
}
TITLES = {"final": "final val loss", "before_finish": "val loss before the finish",
          "realized": "val loss right after realize"}


# ------------------------------------------------------------------ the design


@dataclass
class Design:
    free: list[str]
    grid: dict[str, dict[str, bool]]      # the factorial's variants -> free-axis states
    control: str | None
    operating_point: str | None
    frontier: list[str]                   # the dense points (budget < 1, and the full dense baseline)
    baseline: str | None


def design_of(spec: dict) -> Design:
    free, fixed = spec["free_axes"], spec["fixed_axes"]
    variants = spec["variants"]
    # Every full-budget variant whose fixed axes sit at their fixed state is a cell of the factorial,
    # the dense baseline included when every axis is free (it is then the all-off cell).
    grid = {v["name"]: {a: bool(v["axes"][a]) for a in free} for v in variants
            if v.get("budget", 1.0) == 1.0 and all(v["axes"][a] == s for a, s in fixed.items())}
    chosen = spec.get("ablation_config", {}).get("report", {})

    def cell(on: bool) -> str | None:
        return next((n for n, s in grid.items() if all(x == on for x in s.values())), None)

    baseline = next((v["name"] for v in variants if v["baseline"]), None)
    dense = [v["name"] for v in variants if v.get("budget", 1.0) < 1.0] + ([baseline] if baseline else [])
    return Design(free, grid, chosen.get("control") or cell(False),
                  chosen.get("operating_point") or cell(True), dense, baseline)


# ------------------------------------------------------------------ one metric point


@dataclass
class MetricResult:
    name: str
    loss_column: str
    flops_column: str
    layout: stats.Layout
    factorial: stats.Factorial
    cells: dict[str, stats.Estimate]
    flops: dict[str, float]
    effects: dict[str, stats.AxisEffects]
    pairs: dict[str, stats.Estimate]
    frontier: frontier_mod.Frontier | None
    points: dict[str, frontier_mod.FrontierPoint]
    warnings: list[str]

    def tests(self) -> list[stats.Estimate]:
        """The family of tests this metric adds to the report (Holm-adjusted together)."""
        out = [e for a in self.effects.values() for e in (a.simple, a.main, a.leave_one_out)]
        out += [e for a in self.effects.values() for pair in a.conditional.values() for e in pair]
        out += list(self.pairs.values())
        # a frontier point's own gap is zero by construction: not a test
        dense = self.frontier.names if self.frontier else []
        return out + [p.gap for v, p in self.points.items() if v not in dense]

    def to_json(self) -> dict:
        layout = self.layout
        return {
            "metric": self.loss_column, "flops_column": self.flops_column,
            "question": QUESTIONS[self.name],
            "sigma": _num(layout.sigma), "df": layout.df, "balanced": layout.balanced,
            "pseudo_sigma": _num(layout.pseudo_sigma), "warnings": self.warnings,
            "factorial": {"complete": self.factorial.complete, "cells": self.factorial.cells},
            "cells": {v: {"n": layout.n[v], "loss_mean": e.estimate, "ci_low": e.ci[0],
                          "ci_high": e.ci[1], "flops": self.flops.get(v)}
                      for v, e in self.cells.items()},
            "effects": {axis: {
                "simple": a.simple.to_json(), "main": a.main.to_json(),
                "leave_one_out": a.leave_one_out.to_json(),
                "interaction_dominated": a.interaction_dominated,
                "largest_interaction": _num(a.largest_interaction),
                "conditional": {other: {"off": off.to_json(), "on": on.to_json()}
                                for other, (off, on) in a.conditional.items()}}
                for axis, a in self.effects.items()},
            "interactions": {k: e.to_json() for k, e in self.pairs.items()},
            "frontier": {v: p.to_json() for v, p in self.points.items()},
        }


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def analyse_metric(rows: list[dict], design: Design, name: str) -> MetricResult:
    loss_col, flops_col = METRIC_POINTS[name]
    done = [r for r in rows if r["status"] == OK and r.get(loss_col) is not None]
    layout = stats.fit_layout([(r["variant"], r["seed"], float(r[loss_col])) for r in done])
    flops = {}
    for v in layout.variants:
        values = [r[flops_col] for r in done if r["variant"] == v and r.get(flops_col)]
        if values:
            flops[v] = float(np.mean(values))
    factorial = stats.fit_factorial(design.grid, design.free, set(layout.variants))
    layout.pseudo_sigma = stats.lenth_sigma(layout, factorial)
    effects, pairs = stats.axis_effects(layout, factorial, design.grid, design.control,
                                        design.operating_point)
    front = frontier_mod.build_frontier(layout, flops, design.frontier)
    points = {v: frontier_mod.compare(layout, front, v, flops[v]) for v in layout.variants if v in flops}
    warnings = []
    if not layout.balanced:
        missing = [f"{v} ({layout.n[v]}/{len(layout.seeds)} seeds)" for v in layout.variants
                   if layout.n[v] < len(layout.seeds)]
        warnings.append("unbalanced: some trials did not finish (" + ", ".join(missing) + "); variant "
                        "means are least-squares estimates adjusted for the seed")
    if factorial.warning:
        warnings.append(factorial.warning)
    if front is None:
        warnings.append("no dense frontier (fewer than two dense budgets finished): loss gaps and "
                        "compute multipliers are unavailable; set `frontier.budgets`")
    elif np.any(np.diff(front.loss) > 0):
        warnings.append("the dense frontier is not monotone (a larger budget ended with a higher loss): "
                        "multipliers use the first FLOPs at which it reaches a loss")
    cells = {v: stats.contrast(layout, {v: 1.0}) for v in layout.variants}
    return MetricResult(name, loss_col, flops_col, layout, factorial, cells, flops, effects, pairs,
                        front, points, warnings)


# ------------------------------------------------------------------ markdown


def _f(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _si(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def est(e: stats.Estimate, sign: bool = True) -> str:
    """An estimate with its 95% CI, or with its pseudo-SE (one seed), or why it is missing."""
    if not e.defined:
        return f"n/a ({e.note})" if e.note else "n/a"
    text = _f(e.estimate, sign=sign)
    lo, hi = e.ci
    if lo is not None:
        return f"{text} [{_f(lo, sign=sign)}, {_f(hi, sign=sign)}]"
    if e.pseudo_se is not None:
        return f"{text} (pseudo-SE {_f(e.pseudo_se)})"
    return text


def verdict(e: stats.Estimate) -> str:
    if not e.defined:
        return ""
    if e.p_holm is None:
        return "n/a (one seed)" if e.df == 0 else "n/a"
    return f"{'significant' if e.significant else 'not significant'} (p_holm = {e.p_holm:.3g})"


def _multiplier(p: frontier_mod.FrontierPoint | None) -> str:
    if p is None:
        return "n/a"
    if p.multiplier is None:
        if p.outside == "above":
            return f"outside the frontier (< {p.bound:.2f}x)"
        if p.outside == "below":
            return f"outside the frontier (> {p.bound:.2f}x)"
        return "n/a"
    lo, hi = p.multiplier_ci
    if lo is None and hi is None and p.gap.df == 0:
        return f"{p.multiplier:.2f}x"
    return (f"{p.multiplier:.2f}x [{'edge' if lo is None else f'{lo:.2f}'}, "
            f"{'edge' if hi is None else f'{hi:.2f}'}]")


def cell_table(rows: list[dict], result: MetricResult, by_metric: dict[str, MetricResult],
               design: Design) -> list[str]:
    baseline_flops = result.flops.get(design.baseline or "", math.nan)
    lines = ["| variant | n | final val loss [95% CI] | after realize | before finish | FLOPs vs dense "
             "| loss gap at equal FLOPs [95% CI] | compute multiplier [95% CI] | min block LR ratio "
             "| params | peak trainable | tokens/s | wall s |",
             "|---|---:|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]

    def mean(v: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["variant"] == v and r["status"] == OK and r.get(key) is not None]
        return float(np.mean(values)) if values else None

    order = sorted(result.cells, key=lambda v: result.cells[v].estimate)
    for v in order:
        marks = " (control)" if v == design.control else ""
        marks += " (frontier)" if v in design.frontier else ""
        other = {m: r.layout.mu.get(v) for m, r in by_metric.items()}
        rel = result.flops.get(v, math.nan) / baseline_flops
        point = result.points.get(v)
        lines.append(
            f"| {v}{marks} | {result.layout.n[v]} | {est(result.cells[v], sign=False)} | "
            f"{_f(other.get('realized'))} | {_f(other.get('before_finish'))} | {_f(rel, 3)}x | "
            f"{est(point.gap) if point else 'n/a'} | {_multiplier(point)} | "
            f"{_f(mean(v, 'min_block_lr_ratio'), 3)} | {_si(mean(v, 'total_params'))} | "
            f"{_si(mean(v, 'peak_trainable_params'))} | {_si(mean(v, 'tokens_per_s'))} | "
            f"{_f(mean(v, 'wall_time_s'), 0)} |")
    return lines


def metric_section(result: MetricResult, design: Design) -> list[str]:
    lines = [f"## {TITLES[result.name]} (`{result.loss_column}`)", "", f"*Question:* {QUESTIONS[result.name]}", ""]
    lines += [f"- warning: {w}" for w in result.warnings]
    if result.warnings:
        lines.append("")
    if result.frontier is not None:
        lines += ["### Against the dense frontier", "",
                  f"FLOPs: `{result.flops_column}`. Frontier: {', '.join(result.frontier.names)}, mean loss "
                  "interpolated in log FLOPs. Loss gap < 0 and multiplier > 1: the approximation pays off.",
                  "", "| variant | FLOPs | loss | frontier loss at these FLOPs | loss gap [95% CI] | "
                  "significance | compute multiplier [95% CI] |", "|---|---:|---:|---:|---|---|---|"]
        for v, p in sorted(result.points.items(), key=lambda kv: kv[1].flops):
            if v in result.frontier.names:
                continue
            lines.append(f"| {v} | {_si(p.flops)} | {_f(p.loss_mean)} | {_f(p.frontier_loss)} | "
                         f"{est(p.gap)} | {verdict(p.gap)} | {_multiplier(p)} |")
        lines.append("")
    if not design.free:
        return lines
    control = design.control or "n/a"
    lines += [f"### Simple effects against the control `{control}`", "",
              "Each approximation switched on alone in the control configuration (Δ > 0: worse).", "",
              "| approximation | variant | Δ loss [95% CI] | significance |", "|---|---|---|---|"]
    for axis, a in result.effects.items():
        variant = next((v for v, w in a.simple.weights.items() if w > 0), "n/a")
        lines.append(f"| {axis} | {variant} | {est(a.simple)} | {verdict(a.simple)} |")
    lines += ["", "### Conditional effects", "",
              "The effect of each approximation with one other approximation off / on, averaged over "
              "the rest of the grid.", "", "| approximation | given | off: Δ loss [95% CI] | on: Δ loss [95% CI] |",
              "|---|---|---|---|"]
    for axis, a in result.effects.items():
        for other, (off, on) in a.conditional.items():
            lines.append(f"| {axis} | {other} | {est(off)} | {est(on)} |")
    lines += ["", "### Factorial main effects", "",
              "Mean over the grid with the approximation on minus off. Not a ranking: where an "
              "interaction is at least as large, the main effect averages opposite situations.", "",
              "| approximation | main Δ loss [95% CI] | significance | largest two-way interaction | reading |",
              "|---|---|---|---:|---|"]
    for axis, a in result.effects.items():
        reading = stats.NOT_ALONE if a.interaction_dominated else ("" if a.interaction_dominated is None
                                                                     else "interpretable")
        lines.append(f"| {axis} | {est(a.main)} | {verdict(a.main)} | {_f(a.largest_interaction)} | {reading} |")
    if result.pairs:
        lines += ["", "### Two-way interactions", "",
                  "Half the change of one approximation's effect when the other is switched on; ~0: "
                  "the two effects add.", "", "| pair | interaction [95% CI] | significance |", "|---|---|---|"]
        lines += [f"| {k} | {est(e)} | {verdict(e)} |" for k, e in result.pairs.items()]
    op = design.operating_point or "n/a"
    lines += ["", f"### Leave-one-out at the operating point `{op}`", "",
              "Δ = (operating point with the approximation on) − (with it off).", "",
              "| approximation | Δ loss [95% CI] | significance |", "|---|---|---|"]
    lines += [f"| {axis} | {est(a.leave_one_out)} | {verdict(a.leave_one_out)} |"
              for axis, a in result.effects.items()]
    return lines + [""]


# ------------------------------------------------------------------ plots


def plot_pareto(results: dict[str, MetricResult], design: Design, path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5), squeeze=False)
    for ax, result in zip(axes[0], results.values()):
        if result.frontier is not None:
            x, mean, half = frontier_mod.band(result.layout, result.frontier)
            ax.plot(x, mean, "-", color="black", label="dense frontier")
            if not np.all(np.isnan(half)):
                ax.fill_between(x, mean - half, mean + half, color="black", alpha=0.15,
                                label="95% CI")
        names = [v for v in result.points if v not in (result.frontier.names if result.frontier else [])]
        points = [(result.points[v].flops, result.points[v].loss_mean) for v in names]
        front = set(analysis.pareto_front(points))
        for i, v in enumerate(names):
            e = result.cells[v]
            err = e.half_width if e.half_width is not None else 0.0
            color = "tab:red" if v == design.control else ("tab:blue" if i in front else "tab:gray")
            ax.errorbar(points[i][0], points[i][1], yerr=err, fmt="o", color=color, capsize=2, ms=4)
            ax.annotate(v, points[i], fontsize=5, xytext=(3, 3), textcoords="offset points")
        if result.frontier is not None:
            for v in result.frontier.names:
                p = result.points[v]
                err = result.cells[v].half_width or 0.0
                ax.errorbar(p.flops, p.loss_mean, yerr=err, fmt="s", color="black", capsize=2, ms=4)
        ax.set_xscale("log")
        ax.set_xlabel(f"training FLOPs ({result.flops_column})")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{TITLES[result.name]} (red: control; blue: Pareto)", fontsize=9)
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_effects(result: MetricResult, design: Design, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [(axes[0], "simple", f"simple effect at control {design.control}"),
              (axes[1], "main", "factorial main effect (hatched: not interpretable alone)"),
              (axes[2], "leave_one_out", f"leave-one-out at {design.operating_point}")]
    names = list(result.effects)
    for ax, attr, title in panels:
        values = [getattr(result.effects[a], attr) for a in names]
        bars = ax.barh(names, [e.estimate if e.defined else 0.0 for e in values],
                       xerr=[e.half_width or 0.0 for e in values], color="tab:blue", capsize=3)
        if attr == "main":
            for bar, a in zip(bars, names):
                if result.effects[a].interaction_dominated:
                    bar.set_facecolor("lightgray")
                    bar.set_edgecolor("black")
                    bar.set_hatch("//")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"Δ {result.loss_column}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_curves(experiment_dir: Path, spec: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("tab20")
    variants = list(dict.fromkeys(t["variant"] for t in spec["trials"]))
    for trial in spec["trials"]:
        evals = [r for r in evaluations(read_metrics(experiment_dir / TRIALS / trial["trial_name"]))
                 if r.get("tokens") is not None]
        if not evals:
            continue
        index = variants.index(trial["variant"])
        first_seed = trial["seed"] == spec["seeds"][0]
        dense = trial["baseline"] or trial.get("budget", 1.0) < 1.0
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals],
                color="black" if dense else cmap(index % 20), linewidth=2 if trial["baseline"] else 1,
                linestyle="--" if trial.get("budget", 1.0) < 1.0 else "-",
                label=trial["variant"] if first_seed else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss vs tokens (black: dense baseline; dashed: frontier)")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------ the report


def build(experiment_dir: str | Path) -> str:
    """Write results.csv, report.md, report.json and the plots; return the cell table (markdown)."""
    experiment_dir = Path(experiment_dir)
    spec = read_json(experiment_dir / EXPERIMENT_JSON)
    rows = collect(experiment_dir)
    write_csv(rows, experiment_dir / RESULTS_CSV, list(spec["axes"]))
    design = design_of(spec)
    n_seeds = len(spec["seeds"])

    results = {}
    for name in (PRIMARY, "before_finish", "realized"):
        if any(r["status"] == OK and r.get(METRIC_POINTS[name][0]) is not None for r in rows):
            results[name] = analyse_metric(rows, design, name)
    family = stats.holm([e for r in results.values() for e in r.tests()])
    one_seed = all(r.layout.df == 0 for r in results.values())

    entropy = spec.get("val_unigram_entropy")
    n_ok = sum(r["status"] == OK for r in rows)
    lines = [f"# Ablation report: {spec['name']}", "",
             f"Base experiment `{spec['experiment']}`; {len(spec['variants'])} variants × "
             f"{n_seeds} seed(s) = {len(rows)} trials, {n_ok} finished.",
             f"Free axes: {', '.join(design.free) or 'none'}. Fixed: "
             + (", ".join(f"{a} {'on' if v else 'off'}" for a, v in spec["fixed_axes"].items()) or "none")
             + f". Control: `{design.control}`; operating point: `{design.operating_point}`. "
             f"Dense frontier: {', '.join(design.frontier) or 'none'}.",
             "Every grid variant trains on the same number of tokens; frontier points on their "
             "fraction of it, each with its own complete LR schedule.", ""]
    if entropy is not None:
        lines.append(f"Unigram entropy of the validation tokens: **{entropy:.4f} nats/token** "
                     f"({spec.get('val_tokens', 'n/a')} tokens).")
    primary = results.get(PRIMARY)
    if primary is not None and design.baseline in primary.layout.mu:
        base = primary.layout.mu[design.baseline]
        line = f"Dense baseline val loss: **{base:.4f}**"
        if entropy:
            below = 1 - base / entropy
            verdict_word = "meets" if below >= TARGET_BELOW_ENTROPY else "does NOT meet"
            line += (f", {below * 100:.1f}% below the unigram entropy ({verdict_word} the "
                     f"{TARGET_BELOW_ENTROPY * 100:.0f}% bar for a meaningful comparison)")
        lines.append(line + ".")
    lines += ["", "## Statistics", ""]
    if one_seed:
        pseudo = primary.layout.pseudo_sigma if primary else None
        lines.append(f"**One seed: {stats.ONE_SEED}.** Estimates only"
                     + (f"; a Lenth pseudo-SE (per-run σ ≈ {pseudo:.4f}, from the factorial effects, "
                        "assuming most are zero) is shown as a scale, not as a test." if pseudo else ".")
                     + " Run more seeds (`seeds=[...]`) for confidence intervals.")
    elif primary is not None:
        lines.append(f"Paired by seed: variant × seed two-way layout, error term = the variant × seed "
                     f"residual (final loss: σ = {_f(primary.layout.sigma)}, {primary.layout.df} degrees "
                     f"of freedom). 95% t confidence intervals (per comparison); p-values Holm-adjusted "
                     f"over all {family} tests in this report; *significant* means p_holm < "
                     f"{stats.ALPHA:g}.")
    lines.append("How to read the frontier, the multiplier and simple vs main effects: README, "
                 "\"How to read the ablation report\".")

    if primary is not None:
        table = cell_table(rows, primary, results, design)
        lines += ["", "## Cells", "",
                  "Every configuration that ran, by final val loss. *loss gap* and *multiplier* are "
                  "against the dense frontier at the variant's FLOPs (final metric). *params* and "
                  "*peak trainable* count the approximated model; *min block LR ratio*: the "
                  "least-trained block's LR integral over a dense block's.", "", *table, ""]
        for result in results.values():
            lines += metric_section(result, design)
    else:
        table = ["(no finished trial)"]
    failed = [r for r in rows if r["status"] != OK]
    if failed:
        lines += ["## Trials without a result", "", "| trial | status | attempts | error |",
                  "|---|---|---:|---|"]
        for r in failed:
            error = r["error"].splitlines()[-1][:160] if r["error"] else ""
            lines.append(f"| {r['run_dir']} | {r['status']} | {r['attempts']} | {error} |")
        lines.append("")
    lines += ["## Plots", "", "![pareto](pareto.png)", "", "![effects](effects.png)", "",
              "![curves](curves.png)", ""]
    (experiment_dir / "report.md").write_text("\n".join(lines))

    write_json_atomic(experiment_dir / REPORT_JSON, {
        "name": spec["name"], "control": design.control, "operating_point": design.operating_point,
        "n_seeds": n_seeds, "seeds": spec["seeds"], "confidence": stats.CONFIDENCE,
        "alpha": stats.ALPHA, "family_size": family, "one_seed": one_seed, "primary": PRIMARY,
        "free_axes": design.free, "frontier_variants": design.frontier,
        "metrics": {name: r.to_json() for name, r in results.items()},
    })
    if primary is not None:
        plot_pareto(results, design, experiment_dir / "pareto.png")
        plot_effects(primary, design, experiment_dir / "effects.png")
    plot_curves(experiment_dir, spec, experiment_dir / "curves.png")
    return "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_dir")
    args = parser.parse_args(argv)
    try:
        read_experiment(args.experiment_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = build(args.experiment_dir)
    print(table)
    d = Path(args.experiment_dir)
    print(f"\nreport: {d / 'report.md'} (and {d / REPORT_JSON})\nresults: {d / RESULTS_CSV}\nplots: "
          f"{d / 'pareto.png'}, {d / 'effects.png'}, {d / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
