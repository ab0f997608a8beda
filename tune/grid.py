"""The ablation grid: axes declared in YAML -> a list of variants, each a list of config overrides.

An ablation config names a base experiment YAML and a set of *axes*. Each axis is an approximation
that is either on or off, and says which dotted overrides (the same `key=value` strings the command
lines take) it applies in each state:

    axes:
      abba_attn:
        label: abba                      # the token variant names use when the axis is on
        when_on:  ["approx.attn_qkv={kind: abba, r1: 8, r2: 8}"]
        when_off: ["approx.attn_qkv={kind: dense}"]
      layerwise: {label: grow, fixed: true, when_on: [...], when_off: [...]}   # held on everywhere

Free axes (no `fixed`) span the full factorial grid; `requires` drops combinations that cannot run
(freezing needs layer-wise growth). A dense baseline -- every axis off, all blocks from step 0 -- is
always added, and with it the dense compute frontier: the baseline retrained at the fractions
`frontier.budgets` of its steps (variants `dense@0.5`, ...), against which the report judges whether
an approximation pays off at equal FLOPs. `seeds` repeats every variant. Every variant's config is validated here, before Ray
starts, so a bad axis fails in a second with the variant's name instead of inside a trial.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common import StrictModel as _Strict
from distributed.config import (ConfigError, ExperimentConfig, apply_overrides, read_yaml,
                                validate_config)
from tune.frontier import FrontierSpec, frontier_name, scaled_train_overrides

BASELINE_NAME = "dense"


class AxisSpec(_Strict):
    label: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    # (YAML reads a bare `on:` / `off:` key as a boolean, hence the longer names)
    when_on: list[str]
    when_off: list[str] = []
    fixed: bool | None = None  # None: varied across the grid; true/false: held in that state


class ResourcesSpec(_Strict):
    workers_per_trial: int = Field(default=1, ge=1)     # Ray Train workers (DeepSpeed ranks)
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    max_concurrent_trials: int = Field(default=1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl with GPUs, gloo without


class FailureSpec(_Strict):
    trial_retries: int = Field(default=1, ge=0)    # Tune: re-run an errored trial this many times
    worker_restarts: int = Field(default=2, ge=0)  # Train: restart a dead worker group this often


class WandbSpec(_Strict):
    enabled: bool = False
    project: str = "approxgpt-ablation"
    # offline unless an API key is configured (WANDB_API_KEY or `wandb login`)
    mode: Literal["auto", "online", "offline"] = "auto"


class ReportSpec(_Strict):
    # The variant every simple effect is measured against; None: the grid variant with every free
    # axis off (fixed axes at their fixed state), e.g. `grow+finish`.
    control: str | None = None
    # Where leave-one-out toggles each axis; None: the grid variant with every free axis on.
    operating_point: str | None = None


class AblationConfig(_Strict):
    name: str
    experiment: str                  # base experiment YAML, relative to the working directory
    overrides: list[str] = []        # applied to every variant, baseline included, before the axes
    out_dir: str = "runs/ablation"   # the experiment directory
    seeds: list[int] = Field(default=[1337], min_length=1)
    axes: dict[str, AxisSpec]
    requires: dict[str, list[str]] = {}   # axis -> axes that must be on whenever it is on
    baseline_overrides: list[str] = []    # on top of every-axis-off, for the dense baseline
    resources: ResourcesSpec = ResourcesSpec()
    failures: FailureSpec = FailureSpec()
    wandb: WandbSpec = WandbSpec()
    frontier: FrontierSpec = FrontierSpec()
    report: ReportSpec = ReportSpec()

    @model_validator(mode="after")
    def _names_line_up(self) -> "AblationConfig":
        if not self.axes:
            raise ValueError("axes: at least one axis is needed")
        for axis, needed in self.requires.items():
            for name in (axis, *needed):
                if name not in self.axes:
                    raise ValueError(f"requires: {name!r} is not an axis "
                                     f"(axes: {', '.join(self.axes)})")
        labels = [a.label for a in self.axes.values()]
        if len(set(labels)) != len(labels) or BASELINE_NAME in labels:
            raise ValueError(f"axis labels must be unique and not {BASELINE_NAME!r}: {labels}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} has duplicates")
        return self

    @property
    def free_axes(self) -> list[str]:
        return [name for name, spec in self.axes.items() if spec.fixed is None]

    @property
    def fixed_axes(self) -> dict[str, bool]:
        return {name: spec.fixed for name, spec in self.axes.items() if spec.fixed is not None}


@dataclass(frozen=True)
class Variant:
    name: str                 # e.g. "grow+abba+freeze+finish"; "dense" for the baseline
    axes: dict[str, bool]     # every axis -> on/off
    overrides: list[str]      # dotted overrides on top of the base experiment YAML
    baseline: bool = False    # the full-budget dense model (every axis off)
    # Fraction of the dense baseline's steps (and so FLOPs): < 1 for the dense frontier's points,
    # which are the baseline trained to a shorter, complete LR schedule.
    budget: float = 1.0


@dataclass(frozen=True)
class TrialSpec:
    variant: Variant
    seed: int

    @property
    def trial_name(self) -> str:
        # Stable across re-runs of the same ablation: the run directory (and so the trainer's
        # automatic resume) hangs off this name.
        return f"{self.variant.name}_s{self.seed}"


@dataclass
class Grid:
    config: AblationConfig
    variants: list[Variant]
    dropped: list[str] = field(default_factory=list)   # combinations removed by `requires`

    def trials(self) -> list[TrialSpec]:
        return [TrialSpec(v, s) for v in self.variants for s in self.config.seeds]


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    """Read an ablation YAML (plus dotted overrides of its own keys, e.g. `seeds=[0,1]`)."""
    from tune.driver import load_strict

    return load_strict(AblationConfig, path, overrides)


def variant_name(config: AblationConfig, axes: dict[str, bool]) -> str:
    on = [config.axes[name].label for name in config.axes if axes[name]]
    return "+".join(on) if on else "none"


def variant_overrides(config: AblationConfig, axes: dict[str, bool], baseline: bool = False) -> list[str]:
    out = list(config.overrides)
    for name, spec in config.axes.items():
        out += spec.when_on if axes[name] else spec.when_off
    if baseline:
        out += config.baseline_overrides
    return out


def _allowed(config: AblationConfig, axes: dict[str, bool]) -> bool:
    return all(axes[need] for axis, needs in config.requires.items() if axes[axis] for need in needs)


def expand(config: AblationConfig) -> Grid:
    """Every allowed on/off combination of the free axes (fixed axes held), plus the dense baseline."""
    free, fixed = config.free_axes, config.fixed_axes
    variants, dropped = [], []
    for states in itertools.product((False, True), repeat=len(free)):
        axes = {name: fixed.get(name, False) for name in config.axes}
        axes.update(zip(free, states))
        name = variant_name(config, axes)
        if not _allowed(config, axes):
            dropped.append(name)
            continue
        variants.append(Variant(name, axes, variant_overrides(config, axes)))
    # The baseline is every axis off (fixed ones too): dense, no growth, no freezing, no finish. If
    # the grid already holds that combination it becomes the baseline rather than a duplicate.
    off = {name: False for name in config.axes}
    variants = [v for v in variants if v.axes != off]
    baseline = Variant(BASELINE_NAME, off, variant_overrides(config, off, baseline=True), baseline=True)
    frontier = [Variant(frontier_name(BASELINE_NAME, f), off, baseline.overrides, budget=f)
                for f in config.frontier.budgets]
    grid = Grid(config, [baseline, *frontier, *variants], dropped)
    names = [v.name for v in grid.variants if v.budget == 1.0]
    for key in ("control", "operating_point"):
        chosen = getattr(config.report, key)
        if chosen is not None and chosen not in names:
            raise ConfigError(f"report.{key}: {chosen!r} is not a variant of this grid; valid: "
                              f"{', '.join(names)}")
    return grid


def experiment_config(config: AblationConfig, trial: TrialSpec, run_dir: str | Path) -> ExperimentConfig:
    """The validated experiment config of one trial; its out_dir is the trial's run directory."""
    raw = apply_overrides(read_yaml(config.experiment), trial.variant.overrides)
    raw = apply_overrides(raw, [f"seed={trial.seed}", f"name={trial.trial_name}"])
    raw["out_dir"] = str(run_dir)
    source = f"{config.experiment} [variant {trial.variant.name}]"
    if trial.variant.budget != 1.0:
        # A frontier point: the same dense run with every step count scaled, so it gets its own
        # complete warm-up + cosine schedule rather than being a checkpoint of the long run.
        full = validate_config(raw, source=source)
        raw = apply_overrides(raw, scaled_train_overrides(full.train, trial.variant.budget, source))
    return validate_config(raw, source=source)


def validate_grid(grid: Grid) -> None:
    """Build every variant's config once (seed-independent), so mistakes surface before Ray starts."""
    errors, frontier_steps = [], {}
    for variant in grid.variants:
        try:
            cfg = experiment_config(grid.config, TrialSpec(variant, grid.config.seeds[0]), "unused")
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        if variant.budget != 1.0 or variant.baseline:
            frontier_steps.setdefault(cfg.train.max_steps, []).append(variant.name)
    for steps, names in frontier_steps.items():
        if len(names) > 1:
            errors.append(f"frontier.budgets: {', '.join(names)} all train {steps} steps; valid: "
                          "budgets that differ by at least one step of train.max_steps")
    errors = list(dict.fromkeys(errors))   # a bad base config fails every variant the same way
    if len(errors) > 3:
        errors = errors[:3] + [f"(and {len(errors) - 3} more variants fail)"]
    if errors:
        raise ConfigError("\n".join(errors))


def describe(grid: Grid) -> str:
    c = grid.config
    fixed = ", ".join(f"{n}={'on' if v else 'off'}" for n, v in c.fixed_axes.items()) or "none"
    lines = [f"ablation {c.name!r}: {len(grid.variants)} variants x {len(c.seeds)} seed(s) = "
             f"{len(grid.trials())} trials",
             f"  free axes: {', '.join(c.free_axes)}; fixed: {fixed}"]
    if grid.dropped:
        lines.append(f"  dropped by `requires`: {', '.join(grid.dropped)}")
    frontier = [v.name for v in grid.variants if v.budget != 1.0]
    lines.append(f"  dense frontier: {', '.join(frontier) or 'none'} (+ {BASELINE_NAME})")
    return "\n".join(lines)


def experiment_record(grid: Grid) -> dict:
    """What experiment.json holds about the grid: enough for the report to need nothing else."""
    c = grid.config
    return {
        "name": c.name, "experiment": c.experiment, "seeds": list(c.seeds),
        "axes": {name: spec.label for name, spec in c.axes.items()},
        "free_axes": c.free_axes, "fixed_axes": c.fixed_axes,
        "variants": [{"name": v.name, "axes": v.axes, "overrides": v.overrides,
                      "baseline": v.baseline, "budget": v.budget} for v in grid.variants],
        "trials": [{"trial_name": t.trial_name, "variant": t.variant.name, "seed": t.seed,
                    "axes": t.variant.axes, "baseline": t.variant.baseline,
                    "budget": t.variant.budget} for t in grid.trials()],
        "ablation_config": c.model_dump(mode="json"),
    }
