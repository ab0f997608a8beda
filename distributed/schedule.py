"""The stage plan and the learning-rate schedule: pure functions of the config (and the world size).

    plan = build_plan(cfg, world_size=2)
    print(format_plan(plan))
    lr = learning_rate(cfg, plan, step) * new_parameter_warmup(cfg, plan, step)  # for new parameters
    block_budgets(cfg, plan)   # per block: steps trained and the LR summed over them

A plan is a list of stages; each stage fixes the model's structure for a contiguous range of optimizer
steps: how many blocks exist, which blocks and whether the embeddings are frozen, and whether the
model has been realized (every approximation made dense). The training loop only walks the plan.

- Layer-wise growth starts with `schedule.initial_layers` blocks and appends one block per stage (on
  top: growth is forward only) until `model.n_layer`. Without it one stage holds every block.
- `freeze_previous` freezes every block older than the newest one, from the second stage on (and the
  embeddings with `freeze_embeddings`).
- With `growth_fraction` (default) blocks are added during that first share of the steps before the
  finish and the last growth stage trains every block for the rest, so late blocks are not starved;
  `block_budgets` gives each block's steps and LR integral, `dense_lr_integral` the dense baseline's.
- `full_rank_finish` adds a last stage that realizes the model, unfreezes everything and trains on for
  `finish_fraction` of the steps.

Equal token budget: every variant trains for exactly `train.max_steps` optimizer steps of the same
global batch, however the steps are split, so an ablation compares models trained on the same tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distributed.config import ExperimentConfig
from model import GPT
from model.config import ApproxConfig, GPTConfig


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    n_blocks: int
    frozen_blocks: tuple[int, ...]
    embeddings_frozen: bool
    realize: bool          # the model is realized (dense, exact attention) in this stage
    start_step: int        # optimizer steps completed before the stage starts
    steps: int
    tokens: int
    flops_per_token: int   # training FLOPs per token of this stage's structure and freezing
    block_approx: tuple[str, ...]  # a short description of each block's approximations

    @property
    def end_step(self) -> int:
        """Optimizer steps completed when the stage ends (global step numbers are 1-based)."""
        return self.start_step + self.steps

    @property
    def trainable_blocks(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_blocks) if i not in self.frozen_blocks)

    @property
    def flops(self) -> int:
        return self.flops_per_token * self.tokens


def tokens_per_step(cfg: ExperimentConfig, world_size: int) -> int:
    t = cfg.train
    return t.micro_batch_size * t.grad_accum_steps * world_size * cfg.model.block_size


def dense_model_config(config: GPTConfig) -> GPTConfig:
    """The config of the realized model: same shapes, every site dense, exact attention."""
    return config.model_copy(update={"approx": ApproxConfig()})


def split_steps(total: int, weights: list[float]) -> list[int]:
    """Split `total` steps into len(weights) parts >= 1 in proportion to the weights, summing exactly
    to `total` (each part gets one step, the rest goes by largest remainder)."""
    n = len(weights)
    if total < n:
        raise ValueError(f"{total} steps cannot give each of {n} stages at least one step")
    spare = total - n
    shares = [spare * w / sum(weights) for w in weights]
    parts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(n), key=lambda i: (-(shares[i] - parts[i]), i))
    for i in by_remainder[:spare - sum(parts)]:
        parts[i] += 1
    return [p + 1 for p in parts]


def _describe(approx) -> str:
    sites = [getattr(approx, s).describe() for s in ("attn_qkv", "attn_proj", "mlp_fc", "mlp_proj")]
    if not approx.approximated:
        return "dense"
    return f"qkv={sites[0]} proj={sites[1]} fc={sites[2]} mproj={sites[3]} attn={approx.attention.describe()}"


def _structure_flops(config: GPTConfig, n_blocks: int, frozen: tuple[int, ...],
                     embeddings_frozen: bool) -> int:
    # Only shapes and requires_grad matter for the accounting; the meta device allocates nothing.
    with torch.device("meta"):
        model = GPT(config, n_initial_layers=n_blocks)
    for i in frozen:
        model.freeze_layer(i)
    if embeddings_frozen:
        model.freeze_embeddings()
    return model.training_flops_per_token().training


def _structure_model(config: GPTConfig, stage: Stage) -> GPT:
    # Only shapes, names and requires_grad matter; the meta device allocates nothing.
    with torch.device("meta"):
        model = GPT(dense_model_config(config) if stage.realize else config,
                    n_initial_layers=stage.n_blocks)
    for i in stage.frozen_blocks:
        model.freeze_layer(i)
    if stage.embeddings_frozen:
        model.freeze_embeddings()
    return model


def new_parameter_names(cfg: ExperimentConfig, plan: list[Stage], stage: Stage,
                        carried: bool) -> frozenset[str]:
    """Trainable parameters of `stage` whose optimizer state starts there: all of them after a
    boundary when moments are not carried, else those not trainable in the stage before (a grown
    block, an unfrozen one, the dense weights a realize creates). None in the first stage (the
    run's warm-up covers it)."""
    if stage.index == 0:
        return frozenset()
    names = {n for n, p in _structure_model(cfg.model, stage).named_parameters() if p.requires_grad}
    if not carried:
        return frozenset(names)
    before = _structure_model(cfg.model, plan[stage.index - 1])
    return frozenset(names - {n for n, p in before.named_parameters() if p.requires_grad})


def build_plan(cfg: ExperimentConfig, world_size: int = 1) -> list[Stage]:
    s, n_layer = cfg.schedule, cfg.model.n_layer
    growth_sizes = list(range(s.initial_layers, n_layer + 1)) if s.layerwise else [n_layer]
    finish_steps = 0
    if s.full_rank_finish:
        finish_steps = max(1, round(s.finish_fraction * cfg.train.max_steps))
        finish_steps = min(finish_steps, cfg.train.max_steps - len(growth_sizes))
    n_growth = len(growth_sizes)
    if s.stage_weights is not None:
        weights = s.stage_weights
    elif s.growth_fraction is not None and n_growth > 1:
        weights = [s.growth_fraction / (n_growth - 1)] * (n_growth - 1) + [1.0 - s.growth_fraction]
    else:
        weights = [1.0] * n_growth
    steps = split_steps(cfg.train.max_steps - finish_steps, weights)
    per_step = tokens_per_step(cfg, world_size)

    stages: list[Stage] = []
    start = 0
    for index, (n_blocks, n_steps) in enumerate(zip(growth_sizes, steps)):
        frozen = tuple(range(n_blocks - 1)) if s.freeze_previous and index > 0 else ()
        emb_frozen = s.freeze_embeddings and index > 0
        name = f"grow {n_blocks}/{n_layer}" if s.layerwise else f"all {n_layer}"
        stages.append(Stage(
            index=index, name=name, n_blocks=n_blocks, frozen_blocks=frozen,
            embeddings_frozen=emb_frozen, realize=False, start_step=start, steps=n_steps,
            tokens=n_steps * per_step,
            flops_per_token=_structure_flops(cfg.model, n_blocks, frozen, emb_frozen),
            block_approx=tuple(_describe(cfg.model.for_block(i)) for i in range(n_blocks))))
        start += n_steps
    if finish_steps:
        stages.append(Stage(
            index=len(stages), name="full-rank finish", n_blocks=n_layer, frozen_blocks=(),
            embeddings_frozen=False, realize=True, start_step=start, steps=finish_steps,
            tokens=finish_steps * per_step,
            flops_per_token=_structure_flops(dense_model_config(cfg.model), n_layer, (), False),
            block_approx=("dense",) * n_layer))
    assert stages[-1].end_step == cfg.train.max_steps
    return stages


def stage_at(plan: list[Stage], completed_steps: int) -> Stage:
    """The stage that the next optimizer step (completed_steps + 1) belongs to; the last stage once
    the plan is done."""
    for stage in plan:
        if completed_steps < stage.end_step:
            return stage
    return plan[-1]


def format_plan(plan: list[Stage]) -> str:
    header = ("stage", "name", "blocks", "frozen", "emb", "realized", "steps", "step range",
              "tokens", "train FLOPs")
    rows = []
    for st in plan:
        frozen = ",".join(map(str, st.frozen_blocks)) or "-"
        rows.append((str(st.index), st.name, str(st.n_blocks), frozen,
                     "frozen" if st.embeddings_frozen else "train", "yes" if st.realize else "no",
                     str(st.steps), f"{st.start_step + 1}-{st.end_step}", f"{st.tokens:,}",
                     f"{st.flops:.3e}"))
    total_tokens = sum(st.tokens for st in plan)
    rows.append(("total", "", "", "", "", "", str(sum(st.steps for st in plan)), "",
                 f"{total_tokens:,}", f"{sum(st.flops for st in plan):.3e}"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    blocks_by_text: dict[str, set[int]] = {}
    for st in plan:
        if not st.realize:
            for i, text in enumerate(st.block_approx):
                blocks_by_text.setdefault(text, set()).add(i)
    for text, blocks in blocks_by_text.items():
        lines.append(f"blocks {','.join(map(str, sorted(blocks)))}: {text}")
    lines += [f"stage {st.index} realizes every block (dense linears, exact attention)"
              for st in plan if st.realize][:1]
    return "\n".join(lines)


def _cosine(it: int, start: int, length: int, peak: float, floor: float) -> float:
    """Cosine from `peak` (iteration `start`) to `floor` (iteration start + length, clamped after)."""
    ratio = min(1.0, max(0, it - start) / max(1, length))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def decay_steps(cfg: ExperimentConfig) -> int:
    """Length of wsd's final decay: the finish's steps when there is one, else the same share of the
    run (so a variant and its dense baseline decay over the same steps)."""
    t, s = cfg.train, cfg.schedule
    return max(1, min(round(s.finish_fraction * t.max_steps), t.max_steps - t.warmup_steps))


def learning_rate(cfg: ExperimentConfig, plan: list[Stage], step: int) -> float:
    """The schedule's LR for optimizer step `step` (1-based), before the per-group multipliers and
    the warm-up of new parameters (`new_parameter_warmup`).

    cosine: nanoGPT's linear warm-up over `warmup_steps`, cosine to min_lr at the last step.
    wsd:    the same warm-up, then constant, then a linear decay to min_lr over the final
            `decay_steps` (the finish, when there is one): late blocks train at the full LR.
    stage:  every stage its own warm-up (the run's for the first, `rewarmup_steps` after) and cosine
            to min_lr at its end."""
    t = cfg.train
    it = step - 1  # iterations completed before this step, as in nanoGPT
    kind = cfg.schedule.lr_schedule
    if kind == "stage":
        stage = stage_at(plan, it)
        warm = t.warmup_steps if stage.index == 0 else cfg.schedule.rewarmup_steps
        warm = min(warm, stage.steps - 1)
        into = it - stage.start_step
        if into < warm:
            return t.learning_rate * (into + 1) / (warm + 1)
        return _cosine(into, warm, stage.steps - 1 - warm, t.learning_rate, t.min_lr)
    if it < t.warmup_steps:
        return t.learning_rate * (it + 1) / (t.warmup_steps + 1)
    if kind == "cosine":
        return _cosine(it, t.warmup_steps, t.max_steps - t.warmup_steps, t.learning_rate, t.min_lr)
    length = decay_steps(cfg)
    into = it - (t.max_steps - length)  # 0 on the decay's first step, length - 1 on the run's last
    if into < 0:
        return t.learning_rate
    return t.learning_rate + (into + 1) / length * (t.min_lr - t.learning_rate)


def new_parameter_warmup(cfg: ExperimentConfig, plan: list[Stage], step: int) -> float:
    """LR factor for parameters whose optimizer state starts in the stage of `step` (a grown block,
    the dense weights a realize creates): a linear ramp over `rewarmup_steps`. Parameters whose Adam
    moments are carried over follow the schedule unchanged; under `stage` every parameter re-warms
    with its stage, so the factor is 1."""
    it = step - 1
    stage = stage_at(plan, it)
    k = cfg.schedule.rewarmup_steps
    into = it - stage.start_step
    if cfg.schedule.lr_schedule == "stage" or stage.index == 0 or into >= k:
        return 1.0
    return (into + 1) / (k + 1)


@dataclass(frozen=True)
class BlockBudget:
    index: int
    steps_trained: int     # optimizer steps in which the block is trainable
    lr_integral: float     # the schedule's LR summed over exactly those steps


def block_budgets(cfg: ExperimentConfig, plan: list[Stage]) -> list[BlockBudget]:
    """Every block's update budget under the plan: a block trains from the stage that adds it to the
    end, except in the stages that freeze it (it trains again in the finish)."""
    lrs = [learning_rate(cfg, plan, step) for step in range(1, cfg.train.max_steps + 1)]
    out = []
    for i in range(cfg.model.n_layer):
        steps = [n for st in plan if i < st.n_blocks and i not in st.frozen_blocks
                 for n in range(st.start_step, st.end_step)]
        out.append(BlockBudget(i, len(steps), math.fsum(lrs[n] for n in steps)))
    return out


def dense_baseline_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The ablation's dense baseline of `cfg`: every block from step 0, nothing frozen, no finish,
    the same steps and the same LR schedule."""
    schedule = cfg.schedule.model_copy(update={"layerwise": False, "freeze_previous": False,
                                               "freeze_embeddings": False, "full_rank_finish": False})
    return cfg.model_copy(update={"schedule": schedule})


def dense_lr_integral(cfg: ExperimentConfig) -> float:
    """One block's LR integral in the dense baseline (every block trains every step)."""
    dense = dense_baseline_config(cfg)
    return block_budgets(dense, build_plan(dense))[0].lr_integral


def plan_record(cfg: ExperimentConfig, plan: list[Stage]) -> dict:
    """The plan as JSON-able data: stages, per-block budgets and the dense baseline's budget."""
    return {"lr_schedule": cfg.schedule.lr_schedule, "stages": [vars(s) for s in plan],
            "blocks": [vars(b) for b in block_budgets(cfg, plan)],
            "dense_lr_integral": dense_lr_integral(cfg)}


def format_budgets(record: dict) -> str:
    """The per-block budget table of `plan_record`."""
    dense = record["dense_lr_integral"]
    lines = [f"per-block budget ({record['lr_schedule']} LR; dense baseline: {dense:.4g} per block)",
             "block  steps  LR integral  / dense"]
    for b in record["blocks"]:
        lines.append(f"{b['index']:<5}  {b['steps_trained']:>5}  {b['lr_integral']:>11.4g}  "
                     f"{b['lr_integral'] / dense:>7.1%}")
    return "\n".join(lines)
