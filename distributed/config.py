"""The experiment config: one YAML file (plus dotted overrides) -> one typed, validated object.

    cfg = load_config("configs/experiments/tiny.yaml", ["model.n_layer=6", "approx.mlp_fc.rank=32"])
    model = GPT(cfg.model)

Every launcher (python -m distributed.train, the deepspeed launcher, Ray Train workers) goes through
`load_config` or `ExperimentConfig.model_validate`, so validation happens once, before any expensive
work, and a mistake is reported as one line naming the key path, the bad value and what is valid.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from common import StrictModel as _Strict
from common import format_validation_error, padded_vocab_size
from data.config import KNOWN_VOCAB_SIZES, DataConfig, is_known_tokenizer
from model.config import ApproxConfig, GPTConfig


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the YAML or the command line."""


class ScheduleConfig(_Strict):
    """The stage plan's knobs (see distributed/schedule.py)."""

    layerwise: bool = True           # grow one block per stage, starting from `initial_layers`
    initial_layers: int = Field(default=1, ge=1)
    freeze_previous: bool = False    # freeze every block older than the newest one
    freeze_embeddings: bool = False  # with freeze_previous: also freeze wte/wpe after stage 1
    full_rank_finish: bool = False   # realize every approximation, unfreeze all, train on
    finish_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # share of the token budget
    stage_weights: list[float] | None = None  # relative length of the growth stages (then growth_fraction: null)
    # Blocks are added during the first `growth_fraction` of the steps before the finish (equal
    # stages); the last growth stage, every block present, trains on for the rest. Equal stages over
    # the whole run would leave the last block 1/n_layer of the steps, all near min_lr (issue 12).
    growth_fraction: float | None = Field(default=0.4, gt=0.0, lt=1.0)
    # The LR's shape over the run (distributed/schedule.py): `cosine` one warm-up + cosine over the
    # run; `wsd` warm-up, constant, decay over the final `finish_fraction` of the steps (the finish
    # when there is one); `stage` a warm-up + cosine within every stage.
    lr_schedule: Literal["cosine", "wsd", "stage"] = "wsd"
    # Linear LR warm-up over the first steps of a stage for parameters whose optimizer state is new
    # there (a grown block, realized weights); under `stage` the warm-up of every stage after the first.
    rewarmup_steps: int = Field(default=0, ge=0)


class TrainConfig(_Strict):
    max_steps: int = Field(default=1000, ge=1)  # optimizer steps for the whole run, every stage
    micro_batch_size: int = Field(default=8, ge=1)  # sequences per rank per micro-step
    grad_accum_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=6e-4, gt=0.0)
    min_lr: float = Field(default=6e-5, ge=0.0)
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(default=1.0, ge=0.0)  # 0 disables clipping
    eval_interval: int = Field(default=100, ge=1)
    log_interval: int = Field(default=10, ge=1)
    checkpoint_interval: int = Field(default=0, ge=0)  # 0: only at stage ends
    keep_checkpoints: int = Field(default=2, ge=2)  # newest complete checkpoints kept on disk
    # torch.compile the model of every stage's engine (DeepSpeed's engine.compile, inductor). Fuses
    # the elementwise work the FLOPs leave out (GELU, bias, LayerNorm, compressed attention's pooling);
    # costs one compilation per stage (structure and trainability change at each boundary) plus one
    # for evaluation, so it pays on long stages. Needs a C++ compiler on CPU.
    compile: bool = False

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.learning_rate:
            raise ValueError(f"train.min_lr = {self.min_lr} is larger than train.learning_rate = "
                             f"{self.learning_rate}; valid: 0 <= min_lr <= learning_rate")
        return self


class LrMultConfig(_Strict):
    """LR multiplier per parametrization (embeddings and norms: 1). At one LR the first Adam step
    moves a realized ABBA weight ~0.35x and a low-rank one 0.65-1.1x as far as a dense weight."""

    dense: float = Field(default=1.0, gt=0.0)
    lowrank: float = Field(default=1.0, gt=0.0)
    abba: float = Field(default=1.0, gt=0.0)
    compression: float = Field(default=1.0, gt=0.0)  # compressed attention's own parameters


class OptimizerConfig(_Strict):
    """AdamW's parameter groups (distributed/engine.py): one per (parametrization, decay, new)."""

    lr_mult: LrMultConfig = LrMultConfig()
    # Weight decay on the factors of W = B A penalises |B|^2 + |A|^2 >= 2 |W|_* (nuclear norm, equal
    # at the balanced factorisation): a pull towards low rank, not the dense weight's |W|^2. `none`
    # trains factors without decay.
    factor_weight_decay: Literal["decay", "none"] = "decay"


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    offload_optimizer: bool = False
    # ZeRO-3 keeps parameters smaller than this unpartitioned (DeepSpeed's default: 1e5 elements);
    # None keeps DeepSpeed's default, 0 partitions everything (tiny test models).
    param_persistence_threshold: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedConfig":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer = true needs deepspeed.zero_stage 1, 2 or 3 "
                             "(ZeRO keeps the optimizer state it offloads); got zero_stage = 0")
        return self


class WandbConfig(_Strict):
    enabled: bool = False
    project: str = "approxgpt"
    entity: str | None = None
    # offline unless an API key is configured (WANDB_API_KEY or `wandb login`): see distributed/
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class DebugConfig(_Strict):
    """Fault injection for tests of recovery (kills, preemption, divergence); off by default."""

    kill_at_step: int | None = Field(default=None, ge=1)  # SIGKILL self after this step (+ its checkpoint)
    kill_rank: int = Field(default=0, ge=0)               # which rank kills itself
    nan_at_step: int | None = Field(default=None, ge=1)   # make this step's loss NaN on every rank
    # sleep this long after every optimizer step, so that a test can interrupt a micro run mid-way
    # on a fast machine as on a slow one
    step_delay_s: float = Field(default=0.0, ge=0.0, le=60.0)


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 1337
    out_dir: str = "runs/experiment"
    model: GPTConfig = GPTConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    wandb: WandbConfig = WandbConfig()
    debug: DebugConfig = DebugConfig()

    @model_validator(mode="before")
    @classmethod
    def _approx_into_model(cls, raw: Any) -> Any:
        # Users write `approx:` at the top level (it is what ablations vary); the model is built
        # from one GPTConfig, so the section is moved into it here, once.
        if isinstance(raw, dict) and "approx" in raw:
            raw = dict(raw)
            model = dict(raw.get("model") or {})
            if "approx" in model:
                raise ValueError("approximations are set in the top-level `approx:` section, "
                                 "not under `model.approx`")
            model["approx"] = raw.pop("approx")
            raw["model"] = model
        if isinstance(raw, dict):
            raw = cls._vocab_from_tokenizer(raw)
        return raw

    @staticmethod
    def _vocab_from_tokenizer(raw: dict) -> dict:
        # model.vocab_size defaults to the tokenizer's vocabulary padded to a multiple of 64.
        model = raw.get("model") or {}
        if not isinstance(model, dict) or model.get("vocab_size") is not None:
            return raw
        data = raw.get("data") or {}
        tokenizer = data.get("tokenizer", DataConfig.model_fields["tokenizer"].default) \
            if isinstance(data, dict) else None
        if not isinstance(tokenizer, str) or not is_known_tokenizer(tokenizer):
            return raw  # DataConfig names the bad data.tokenizer; the vocabulary is moot until then
        if tokenizer not in KNOWN_VOCAB_SIZES:
            raise ValueError(f"model.vocab_size must be set for tokenizer {tokenizer!r} "
                             f"(known without loading: {', '.join(KNOWN_VOCAB_SIZES)})")
        raw = dict(raw)
        raw["model"] = {**model, "vocab_size": padded_vocab_size(KNOWN_VOCAB_SIZES[tokenizer])}
        return raw

    @model_validator(mode="after")
    def _schedule_fits(self) -> "ExperimentConfig":
        s = self.schedule
        if s.freeze_previous and not s.layerwise:
            raise ValueError("schedule.freeze_previous = true needs schedule.layerwise = true "
                             "(only blocks trained in an earlier stage can be frozen)")
        if s.freeze_embeddings and not s.freeze_previous:
            raise ValueError("schedule.freeze_embeddings = true needs "
                             "schedule.freeze_previous = true")
        if s.layerwise and s.initial_layers > self.model.n_layer:
            raise ValueError(f"schedule.initial_layers = {s.initial_layers} is larger than "
                             f"model.n_layer = {self.model.n_layer}")
        if s.stage_weights is not None and s.growth_fraction is not None:
            raise ValueError(f"schedule.stage_weights = {s.stage_weights} and schedule.growth_fraction = "
                             f"{s.growth_fraction} both set the growth stages' lengths; set "
                             "schedule.growth_fraction=null to use stage_weights")
        if s.stage_weights is not None:
            n_growth = self.model.n_layer - s.initial_layers + 1 if s.layerwise else 1
            if len(s.stage_weights) != n_growth or any(w <= 0 for w in s.stage_weights):
                raise ValueError(f"schedule.stage_weights = {s.stage_weights}: needs {n_growth} "
                                 "positive numbers, one per growth stage")
        n_stages = (self.model.n_layer - s.initial_layers + 1 if s.layerwise else 1) \
            + int(s.full_rank_finish)
        if self.train.max_steps < n_stages:
            raise ValueError(f"train.max_steps = {self.train.max_steps} is smaller than the {n_stages} "
                             "stages of the schedule; every stage needs at least one step")
        n_vocab = KNOWN_VOCAB_SIZES.get(self.data.tokenizer)
        if n_vocab is not None and self.model.vocab_size < n_vocab:
            raise ValueError(f"model.vocab_size = {self.model.vocab_size} is smaller than the "
                             f"{self.data.tokenizer!r} tokenizer's {n_vocab} tokens")
        if self.train.warmup_steps > self.train.max_steps:
            raise ValueError(f"train.warmup_steps = {self.train.warmup_steps} is larger than "
                             f"train.max_steps = {self.train.max_steps}")
        return self

    @property
    def approx(self) -> ApproxConfig:
        return self.model.approx

    def to_yaml_dict(self) -> dict:
        """The config as a plain dict in the YAML layout (approx at the top level)."""
        raw = self.model_dump(mode="json")
        raw["approx"] = raw["model"].pop("approx")
        return raw


def split_key_path(key: str, item: str | None = None) -> list[str]:
    """Split a dotted key path. A segment in double quotes is one key even when it holds dots, so
    maps keyed by dotted names can be addressed: `space."approx.mlp_fc.rank".high=64` is
    ["space", "approx.mlp_fc.rank", "high"]. (No segment may contain `=`: the first one ends the key.)"""
    where = f"override {item!r}" if item is not None else f"key {key!r}"
    parts, i = [], 0
    while True:
        if key.startswith('"', i):
            end = key.find('"', i + 1)
            if end < 0:
                raise ConfigError(f"{where}: unclosed quote in {key!r}")
            part, i = key[i + 1:end], end + 1
            if i < len(key) and key[i] != ".":
                raise ConfigError(f"{where}: a quoted segment must be followed by '.' or '=' "
                                  f"in {key!r}")
        else:
            end = key.find(".", i)
            end = len(key) if end < 0 else end
            part, i = key[i:end], end
            if '"' in part:
                raise ConfigError(f"{where}: a quote may only open a whole segment in {key!r}")
        if not part:
            raise ConfigError(f"{where}: empty key segment in {key!r}")
        parts.append(part)
        if i >= len(key):
            return parts
        i += 1  # the dot


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted `key=value` strings; values are parsed as YAML (`32`, `true`, `{kind: dense}`).
    Quote a segment that contains dots: `space."approx.mlp_fc.rank".high=64`."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, _, text = item.partition("=")
        parts = split_key_path(key.strip(), item)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({yaml_problem(exc)})") from None
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _key_path(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts[:2] == ["model", "approx"]:  # report the key the user wrote
        parts = parts[1:]
    return ".".join(parts)


def validate_config(raw: dict, source: str | Callable[[str, str], str] = "config") -> ExperimentConfig:
    """source: where the config came from, or a function of (bad key path, message) (see load_config)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(
            exc, source, key_path=_key_path,
            unknown_key_hint="check the spelling against configs/experiments/tiny.yaml")) from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(exc, "problem", None) or str(exc).splitlines()[0])


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist "
                          "(see configs/experiments/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, "
                          f"got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config, apply dotted overrides, validate, return the typed config."""
    raw = read_yaml(path) if path is not None else {}
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides)
    file = str(path) if path is not None else "config"
    set_by = {item.partition("=")[0].strip(): item for item in overrides}

    def related(a: str, b: str) -> bool:
        return bool(a and b) and (a == b or a.startswith(b + ".") or b.startswith(a + "."))

    def source(key: str, message: str) -> str:
        # Blame the command-line override that set the bad key (or a section or key inside it), or
        # that a cross-field message names, not the YAML file the user did not touch.
        named = [key] + [w.strip(".,;:()`'") for w in message.split() if "." in w.strip(".")]
        for item_key in reversed(list(set_by)):
            if any(related(item_key, k) for k in named):
                return f"override {set_by[item_key]!r}"
        return file

    return validate_config(raw, source=source)
