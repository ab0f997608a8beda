"""The stage plan and the learning-rate schedule: pure functions of the config (and the world size).

    plan = build_plan(cfg, world_size=2)
    print(format_plan(plan))
    lr = learning_rate(cfg, plan, step)

A plan is a list of stages; each stage fixes the model's structure for a contiguous range of optimizer
steps: how many blocks exist, which blocks and whether the embeddings are frozen, and whether the
model has been realized (every approximation made dense). The training loop only walks the plan.

- Layer-wise growth starts with `schedule.initial_layers` blocks and appends one block per stage (on
  top: growth is forward only) until `model.n_layer`. Without it one stage holds every block.
- `freeze_previous` freezes every block older than the newest one, from the second stage on (and the
  embeddings with `freeze_embeddings`).
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


def build_plan(cfg: ExperimentConfig, world_size: int = 1) -> list[Stage]:
    s, n_layer = cfg.schedule, cfg.model.n_layer
    growth_sizes = list(range(s.initial_layers, n_layer + 1)) if s.layerwise else [n_layer]
    finish_steps = 0
    if s.full_rank_finish:
        finish_steps = max(1, round(s.finish_fraction * cfg.train.max_steps))
        finish_steps = min(finish_steps, cfg.train.max_steps - len(growth_sizes))
    weights = s.stage_weights or [1.0] * len(growth_sizes)
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


def learning_rate(cfg: ExperimentConfig, plan: list[Stage], step: int) -> float:
    """LR for optimizer step `step` (1-based): one linear warm-up + cosine decay to min_lr over the
    whole run, times a linear re-warm-up over the first `rewarmup_steps` steps of every stage after
    the first (a new block, a freeze or realizing changes the loss landscape; Adam's moments for new
    parameters start at zero)."""
    t = cfg.train
    it = step - 1  # iterations completed before this step, as in nanoGPT
    if it < t.warmup_steps:
        lr = t.learning_rate * (it + 1) / (t.warmup_steps + 1)
    else:
        decay_steps = max(1, t.max_steps - t.warmup_steps)
        ratio = min(1.0, (it - t.warmup_steps) / decay_steps)
        lr = t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.learning_rate - t.min_lr)
    stage = stage_at(plan, it)
    k = cfg.schedule.rewarmup_steps
    into_stage = it - stage.start_step
    if stage.index > 0 and into_stage < k:
        lr *= (into_stage + 1) / (k + 1)
    return lr
