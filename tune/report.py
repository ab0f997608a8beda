"""The ablation report, rebuilt from an experiment directory's logged results alone.

    python -m tune.report runs/ablation-tiny

writes results.csv, report.md, pareto.png, effects.png and curves.png into the directory and prints
the ranked table. Nothing here needs Ray or the model: the inputs are experiment.json, each trial's
trial.json and the trainer's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from tune import analysis  # noqa: E402
from tune.results import (EXPERIMENT_JSON, OK, RESULTS_CSV, TRIALS, collect, evaluations,  # noqa: E402
                          read_experiment, read_json, read_metrics, write_csv)

# The dense baseline must end this far below the unigram entropy for the comparison to mean
# something (a model that only learned token frequencies sits at the entropy).
TARGET_BELOW_ENTROPY = 0.25


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x * 100:+.1f}%"


def _si(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _noise_word(effect: analysis.Effect) -> str:
    flag = effect.within_noise
    return "?" if flag is None else ("yes" if flag else "no")


def ranked_table(stats: list[analysis.VariantStats], baseline_flops: float) -> list[str]:
    lines = ["| rank | variant | val loss (mean ± std) | seeds | before finish | FLOPs vs dense "
             "| params | peak trainable | tokens/s | wall s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rank, s in enumerate(sorted(stats, key=lambda s: s.loss_mean), start=1):
        std = "" if math.isnan(s.loss_std) else f" ± {s.loss_std:.4f}"
        rel = s.flops_mean / baseline_flops if baseline_flops and not math.isnan(baseline_flops) else math.nan
        lines.append(f"| {rank} | {s.name} | {s.loss_mean:.4f}{std} | {s.n} | "
                     f"{_f(s.before_finish_mean)} | {_f(rel, 3)}x | {_si(s.total_params)} | "
                     f"{_si(s.peak_trainable_params)} | {_si(s.tokens_per_s_mean)} | "
                     f"{_f(s.wall_time_mean, 0)} |")
    return lines


def effects_table(effects: list[analysis.Effect], what: str) -> list[str]:
    lines = [f"| {what} | Δ val loss | ± 2·SE | Δ training FLOPs | within seed noise |",
             "|---|---:|---:|---:|:---:|"]
    for e in effects:
        lines.append(f"| {e.name} | {_f(e.d_loss, 4)} | {_f(2 * e.se, 4)} | {_pct(e.d_flops_rel)} "
                     f"| {_noise_word(e)} |")
    return lines


def plot_pareto(stats: list[analysis.VariantStats], path: Path) -> None:
    points = [(s.flops_mean, s.loss_mean) for s in stats]
    front = analysis.pareto_front(points)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, s in enumerate(stats):
        err = 0.0 if math.isnan(s.loss_std) else s.loss_std
        color = "tab:red" if s.baseline else ("tab:blue" if i in front else "tab:gray")
        ax.errorbar(s.flops_mean, s.loss_mean, yerr=err, fmt="o", color=color, capsize=2)
        ax.annotate(s.name, (s.flops_mean, s.loss_mean), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-", color="tab:blue",
                label="Pareto front")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("val loss vs training FLOPs (red: dense baseline)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_effects(main: list[analysis.Effect], loo: list[analysis.Effect], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [(axes[0], main, "d_loss", "main effect on val loss"),
              (axes[1], loo, "d_loss", "leave-one-out from all-on: val loss"),
              (axes[2], main, "d_flops_rel", "main effect on training FLOPs (relative)")]
    for ax, effects, attr, title in panels:
        names = [e.name for e in effects]
        values = [getattr(e, attr) for e in effects]
        errors = [2 * e.se if attr == "d_loss" and not math.isnan(e.se) else 0.0 for e in effects]
        ax.barh(names, values, xerr=errors, color="tab:blue", capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=9)
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
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals],
                color="black" if trial["baseline"] else cmap(index % 20),
                linewidth=2 if trial["baseline"] else 1,
                label=trial["variant"] if first_seed else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss vs tokens (black: dense baseline)")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def build(experiment_dir: str | Path) -> str:
    """Write results.csv, report.md and the plots; return the report's ranked table (markdown)."""
    experiment_dir = Path(experiment_dir)
    spec = read_json(experiment_dir / EXPERIMENT_JSON)
    free, all_axes = spec["free_axes"], list(spec["axes"])
    rows = collect(experiment_dir)
    write_csv(rows, experiment_dir / RESULTS_CSV, all_axes)

    stats = analysis.variant_stats(rows, all_axes)
    baseline = next((s for s in stats if s.baseline), None)
    baseline_flops = baseline.flops_mean if baseline else math.nan
    noise = analysis.noise_sigma(stats, free)
    main = analysis.main_effects(stats, free, noise)
    top_name, loo = analysis.leave_one_out(stats, free, noise)
    pairs = analysis.interactions(stats, free, noise)

    entropy = spec.get("val_unigram_entropy")
    n_ok = sum(r["status"] == OK for r in rows)
    lines = [f"# Ablation report: {spec['name']}", "",
             f"Base experiment `{spec['experiment']}`; {len(spec['variants'])} variants × "
             f"{len(spec['seeds'])} seed(s) = {len(rows)} trials, {n_ok} finished.",
             f"Free axes: {', '.join(free) or 'none'}. Fixed: "
             + (", ".join(f"{a} {'on' if v else 'off'}" for a, v in spec["fixed_axes"].items()) or "none")
             + ". The dense baseline has every axis off (all blocks from step 0, no approximation).",
             "Every variant trains on the same number of tokens.", ""]
    if entropy is not None:
        lines.append(f"Unigram entropy of the validation tokens: **{entropy:.4f} nats/token** "
                     f"({spec.get('val_tokens', 'n/a')} tokens).")
    if baseline is not None:
        line = f"Dense baseline val loss: **{baseline.loss_mean:.4f}**"
        if entropy:
            below = 1 - baseline.loss_mean / entropy
            verdict = "meets" if below >= TARGET_BELOW_ENTROPY else "does NOT meet"
            line += (f", {below * 100:.1f}% below the unigram entropy ({verdict} the "
                     f"{TARGET_BELOW_ENTROPY * 100:.0f}% bar for a meaningful comparison)")
        lines.append(line + ".")
    table = ranked_table(stats, baseline_flops)
    lines += ["", "## Variants ranked by final validation loss", "",
              "FLOPs are training FLOPs relative to the dense baseline. *before finish*: val loss "
              "just before the full-rank finish (equal to the final loss without one). *params* and "
              "*peak trainable* count the approximated model, before the finish makes it dense.",
              "", *table]

    lines += ["", "## Effect of each approximation", "",
              "Mean change when the approximation is switched on, over every combination of the "
              "others (negative Δ val loss: better).", "", *effects_table(main, "approximation")]
    if top_name is not None:
        lines += ["", f"## Leave-one-out from the all-on variant `{top_name}`", "",
                  "Δ = (all-on) − (all-on without it): the cost of keeping this approximation "
                  "when all the others are on.", "", *effects_table(loo, "approximation")]
    if pairs:
        lines += ["", "## Two-way interactions", "",
                  "Half the difference between an approximation's effect with the other on and "
                  "with it off; ~0 means the two effects simply add.", "",
                  *effects_table(pairs, "pair")]
    lines += ["", "## Noise", "",
              f"Per-run noise σ of the final val loss: {_f(noise.sigma)} ({noise.source}). "
              "An effect is flagged *within seed noise* when |Δ| < 2·SE; `?`: noise unknown."]
    failed = [r for r in rows if r["status"] != OK]
    if failed:
        lines += ["", "## Trials without a result", "", "| trial | status | attempts | error |",
                  "|---|---|---:|---|"]
        for r in failed:
            error = r["error"].splitlines()[-1][:160] if r["error"] else ""
            lines.append(f"| {r['run_dir']} | {r['status']} | {r['attempts']} | {error} |")
    lines += ["", "## Plots", "", "![pareto](pareto.png)", "", "![effects](effects.png)", "",
              "![curves](curves.png)", ""]
    (experiment_dir / "report.md").write_text("\n".join(lines))

    if stats:
        plot_pareto(stats, experiment_dir / "pareto.png")
        plot_effects(main, loo, experiment_dir / "effects.png")
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
    print(f"\nreport: {d / 'report.md'}\nresults: {d / RESULTS_CSV}\nplots: "
          f"{d / 'pareto.png'}, {d / 'effects.png'}, {d / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
