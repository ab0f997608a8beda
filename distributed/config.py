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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data.config import KNOWN_VOCAB_SIZES, DataConfig, padded_vocab_size
from model.config import ApproxConfig, GPTConfig


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the YAML or the command line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScheduleConfig(_Strict):
    """The stage plan's knobs (see distributed/schedule.py)."""

    layerwise: bool = True           # grow one block per stage, starting from `initial_layers`
    initial_layers: int = Field(default=1, ge=1)
    freeze_previous: bool = False    # freeze every block older than the newest one
    freeze_embeddings: bool = False  # with freeze_previous: also freeze wte/wpe after stage 1
    full_rank_finish: bool = False   # realize every approximation, unfreeze all, train on
    finish_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # share of the token budget
    stage_weights: list[float] | None = None  # relative length of the growth stages; None: equal
    rewarmup_steps: int = Field(default=0, ge=0)  # LR re-warm-up after each stage boundary


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
    # the elementwise work the FLOPs leave out (GELU, bias, LayerNorm, the Linformer's compression);
    # costs one compilation per stage (structure and trainability change at each boundary) plus one
    # for evaluation, so it pays on long stages. Needs a C++ compiler on CPU.
    compile: bool = False

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.learning_rate:
            raise ValueError(f"train.min_lr = {self.min_lr} is larger than train.learning_rate = "
                             f"{self.learning_rate}; valid: 0 <= min_lr <= learning_rate")
        return self


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    offload_optimizer: bool = False
    # ZeRO-3 keeps parameters smaller than this unpartitioned (DeepSpeed's default: 1e5 elements);
    # None keeps DeepSpeed's default, 0 partitions everything (tiny test models).
    param_persistence_threshold: int | None = Field(default=None, ge=0)


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


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 1337
    out_dir: str = "runs/experiment"
    model: GPTConfig = GPTConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
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
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
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


def _lookup(raw: Any, loc: tuple) -> Any:
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and str(part) in node:
            node = node[str(part)]
        else:
            return None
    return node


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One readable line per problem: key path, bad value, what is valid."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = _key_path(loc[:-1]) or "top level"
            lines.append(f"{source}: unknown key {_key_path(loc)!r} (in {parent}); "
                         "check the spelling against configs/experiments/tiny.yaml")
        elif err["type"] in ("value_error", "assertion_error"):
            # Our validators name the key paths themselves; prefix the section they ran in when
            # the message does not already start with a dotted path.
            first = msg.split(" ", 1)[0]
            where = _key_path(loc)
            prefix = f"{where}: " if where and "." not in first else ""
            lines.append(f"{source}: {prefix}{msg}")
        else:
            value = err.get("input")
            lines.append(f"{source}: {_key_path(loc)} = {value!r}: {msg}")
    return "\n".join(lines)


def validate_config(raw: dict, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist "
                          "(see configs/experiments/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, "
                          f"got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config, apply dotted overrides, validate, return the typed config."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides or []))
    return validate_config(raw, source=str(path) if path is not None else "config")
