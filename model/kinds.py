"""Approximation kinds: every kind of linear site and of attention core, declared in one place.

A kind is one class here. It declares everything the rest of the code needs to know about it, and
nothing else switches on the kind's name:

    spec fields   which keys of its spec it needs (`fields`; the spec classes below hold them)
    check         shape-dependent validation, one-line errors naming the key (model/config.py)
    describe      the short text of summaries and stage plans
    build         the nn.Module of a site / attention core (model/gpt.py)
    forward_flops matmul FLOPs per token, counted as computed (model/accounting.py, the stage plan)
    param_count   parameters of the module it builds, from the spec alone
    realize       the exact dense (full-attention) module it becomes for the full-rank finish
    roles         a ParamRole per parameter: which parametrization, factor or not, decayed or not
                  (GPT.parameter_roles, the optimizer's weight-decay groups)

Recipe: adding a linear kind (say a Monarch or Kronecker factorisation)
  1. write its nn.Module (in model/linear.py, like LowRankLinear: forward, `weight`, `realize`,
     `zero_output_`);
  2. here: add its spec keys to LinearSpec (an `int | None` Field with ge=1), subclass LinearKind
     with `name`, `module`, `fields` and the methods whose default does not fit (`forward_flops`,
     `param_count`, `describe`, `check`, `roles`), and add an instance to LINEAR_KINDS;
  3. tests: test_model_linear.py (function, init std, realize) and test_model_accounting.py
     (forward_flops against torch.utils.flop_counter, param_count against the built module).
  The config's `kind` values, validation, FLOP accounting, stage plan, realize and optimizer groups
  then pick it up. An attention core kind works the same way with AttentionKind / ATTENTION_KINDS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, Field, model_validator

from common import StrictModel

from model.attention import CompressedCausalAttention, FullCausalAttention
from model.linear import ABBALinear, LowRankLinear


@dataclass(frozen=True)
class ParamRole:
    """What one parameter is, for the optimizer (contract with distributed/engine.py)."""

    parametrization: str  # "dense", "lowrank", "abba", "compression", "embedding" or "norm"
    factor: bool          # a factor of a factorised weight: the factor weight-decay policy applies
    decay: bool           # weight-decayed under the default policy (not norms, biases, compression)


EMBEDDING = ParamRole("embedding", factor=False, decay=True)
NORM = ParamRole("norm", factor=False, decay=False)


Strict = StrictModel  # the one strict base (common/); the name kinds use for their specs


def _needs(kind: str, fields: tuple[str, ...], spec: BaseModel, what: str) -> None:
    missing = [f for f in fields if getattr(spec, f) is None]
    if missing:
        names = " and ".join(f"`{f}`" for f in fields)
        raise ValueError(f"kind '{kind}' needs {names} ({what})")


# ==================================================================================== linear sites


class LinearKind:
    name: str
    module: type[nn.Module]
    fields: tuple[str, ...] = ()
    factor_names: tuple[str, ...] = ()  # the parameters that are factors of the weight

    def describe(self, spec: "LinearSpec") -> str:
        args = ",".join(f"{f}={getattr(spec, f)}" for f in self.fields)
        return f"{self.name}({args})" if args else self.name

    def check(self, spec: "LinearSpec", fan_in: int, fan_out: int, prefix: str) -> None:
        limit = min(fan_in, fan_out)
        for name in self.fields:  # every field of the factorised kinds is a rank-like inner size
            value = getattr(spec, name)
            if value > limit:
                raise ValueError(f"{prefix}.{name} = {value} is larger than min(in, out) = {limit} "
                                 f"for a {fan_in}->{fan_out} layer; valid: 1..{limit}")

    def build(self, spec: "LinearSpec", fan_in: int, fan_out: int, bias: bool,
              init_std: float) -> nn.Module:
        raise NotImplementedError

    def forward_flops(self, spec: "LinearSpec", fan_in: int, fan_out: int) -> int:
        """Matmul FLOPs per token (2 per multiply-add)."""
        return 2 * self.param_count(spec, fan_in, fan_out, bias=False)

    def param_count(self, spec: "LinearSpec", fan_in: int, fan_out: int, bias: bool) -> int:
        raise NotImplementedError

    def realize(self, layer: nn.Module) -> nn.Linear:
        return layer.realize()

    @torch.no_grad()
    def zero_output_(self, layer: nn.Module) -> None:
        layer.zero_output_()

    def roles(self, layer: nn.Module) -> dict[str, ParamRole]:
        return {name: ParamRole(self.name, factor=name in self.factor_names,
                                decay=name != "bias")  # biases never decay (nanoGPT's rule)
                for name, _ in layer.named_parameters()}


class Dense(LinearKind):
    name, module = "dense", nn.Linear

    def describe(self, spec) -> str:
        return "dense"

    def build(self, spec, fan_in, fan_out, bias, init_std):
        layer = nn.Linear(fan_in, fan_out, bias=bias)
        with torch.no_grad():
            nn.init.normal_(layer.weight, mean=0.0, std=init_std)
            if bias:
                nn.init.zeros_(layer.bias)
        return layer

    def param_count(self, spec, fan_in, fan_out, bias):
        return fan_in * fan_out + (fan_out if bias else 0)

    def realize(self, layer):
        return layer

    @torch.no_grad()
    def zero_output_(self, layer):
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()


class LowRank(LinearKind):
    """W = b @ a, inner dimension `rank`."""

    name, module, fields, factor_names = "lowrank", LowRankLinear, ("rank",), ("a", "b")

    def describe(self, spec) -> str:
        return f"lowrank(r={spec.rank})"

    def build(self, spec, fan_in, fan_out, bias, init_std):
        return LowRankLinear(fan_in, fan_out, spec.rank, bias=bias, init_std=init_std)

    def param_count(self, spec, fan_in, fan_out, bias):
        return spec.rank * (fan_in + fan_out) + (fan_out if bias else 0)


class ABBA(LinearKind):
    """W = (b1 @ a1) * (b2 @ a2); computed through the Khatri-Rao form with inner size r1 * r2."""

    name, module, fields, factor_names = "abba", ABBALinear, ("r1", "r2"), ("a1", "b1", "a2", "b2")

    def build(self, spec, fan_in, fan_out, bias, init_std):
        return ABBALinear(fan_in, fan_out, spec.r1, spec.r2, bias=bias, init_std=init_std)

    def forward_flops(self, spec, fan_in, fan_out):
        # Two thin matmuls through the r1*r2 Khatri-Rao inner dimension; forming the Khatri-Rao
        # factors is per forward pass, not per token, and not counted.
        return 2 * spec.r1 * spec.r2 * (fan_in + fan_out)

    def param_count(self, spec, fan_in, fan_out, bias):
        return (spec.r1 + spec.r2) * (fan_in + fan_out) + (fan_out if bias else 0)


LINEAR_KINDS: dict[str, LinearKind] = {k.name: k for k in (Dense(), LowRank(), ABBA())}


class LinearSpec(Strict):
    """How one linear site is parameterised (the kinds above say what each key means)."""

    kind: Literal[tuple(LINEAR_KINDS)] = "dense"
    rank: int | None = Field(default=None, ge=1)
    r1: int | None = Field(default=None, ge=1)
    r2: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _has_fields(self) -> "LinearSpec":
        _needs(self.kind, self.of_kind.fields, self, "integers >= 1")
        return self

    @property
    def of_kind(self) -> LinearKind:
        return LINEAR_KINDS[self.kind]

    @property
    def approximated(self) -> bool:
        return self.kind != "dense"

    def describe(self) -> str:
        return self.of_kind.describe(self)


def linear_kind_of(layer: nn.Module) -> LinearKind | None:
    """The kind whose module `layer` is (None: not a linear site)."""
    return next((k for k in LINEAR_KINDS.values() if type(layer) is k.module), None)


def make_linear(spec: LinearSpec, in_features: int, out_features: int, bias: bool,
                init_std: float) -> nn.Module:
    """Build one linear site as `spec` says, initialised so its (represented) dense weight has
    element std `init_std` and its bias is zero."""
    return spec.of_kind.build(spec, in_features, out_features, bias, init_std)


def realize_linear(layer: nn.Module) -> nn.Linear:
    """The exact dense equivalent of a linear layer of any kind (dense layers are returned as is)."""
    return linear_kind_of(layer).realize(layer)


def zero_output_(layer: nn.Module) -> None:
    """Make a linear layer of any kind output exactly zero (for function-preserving growth)."""
    linear_kind_of(layer).zero_output_(layer)


# ==================================================================================== attention


@dataclass(frozen=True)
class CoreFlops:
    """Forward matmul FLOPs per token of an attention core, split by how their backward goes."""

    projection: int  # matmuls of keys with the core's own weight (backward: input and weight)
    activation: int  # matmuls between activations (scores, values, pooling; backward: both operands)


class AttentionKind:
    name: str
    module: type[nn.Module]
    fields: tuple[str, ...] = ()

    def describe(self, spec: "AttentionSpec") -> str:
        return self.name

    def check(self, spec: "AttentionSpec", block_size: int, n_embd: int, n_head: int,
              prefix: str) -> None:
        pass

    def build(self, spec: "AttentionSpec", block_size: int, n_embd: int, n_head: int,
              dropout: float) -> nn.Module:
        raise NotImplementedError

    def forward_flops(self, spec: "AttentionSpec", seq_len: int, n_embd: int, n_head: int) -> CoreFlops:
        raise NotImplementedError

    def param_count(self, spec: "AttentionSpec", n_embd: int, n_head: int) -> int:
        return 0

    def realize(self, core: nn.Module) -> nn.Module:
        return core

    def roles(self, core: nn.Module) -> dict[str, ParamRole]:
        return {}


class Full(AttentionKind):
    """Exact causal softmax attention."""

    name, module = "full", FullCausalAttention

    def build(self, spec, block_size, n_embd, n_head, dropout):
        return FullCausalAttention(dropout)

    def forward_flops(self, spec, seq_len, n_embd, n_head):
        # Q K^T and A V over all heads, the query at t seeing t + 1 keys: 2 * 2 * n_embd * (T + 1) / 2.
        # Causal flash kernels skip the blocks above the diagonal, so this is their work up to one tile.
        return CoreFlops(0, 2 * n_embd * (seq_len + 1))


def full_attention_flops(seq_len: int, n_embd: int) -> int:
    return ATTENTION_KINDS["full"].forward_flops(None, seq_len, n_embd, 1).activation


class Compressed(AttentionKind):
    """Transformer-LS causal long-range + local attention (model/attention.py)."""

    name, module, fields = "compressed", CompressedCausalAttention, ("slots", "chunk", "window")

    def describe(self, spec):
        return f"compressed(slots={spec.slots},chunk={spec.chunk},window={spec.window})"

    def check(self, spec, block_size, n_embd, n_head, prefix):
        for name in ("chunk", "window"):
            if getattr(spec, name) > block_size:
                raise ValueError(f"{prefix}.{name} = {getattr(spec, name)} is larger than "
                                 f"block_size = {block_size}; valid: up to {block_size}")
        if spec.slots > spec.chunk:
            raise ValueError(f"{prefix}.slots = {spec.slots} is larger than chunk = {spec.chunk}: "
                             f"a segment would be expanded, not compressed; valid: 1..{spec.chunk}")
        core = sum(vars(self.forward_flops(spec, block_size, n_embd, n_head)).values())
        full = full_attention_flops(block_size, n_embd)
        if core > full and not spec.allow_costlier:
            raise ValueError(
                f"{prefix} = {self.describe(spec)} costs {core / full:.2f}x the FLOPs of full causal "
                f"attention at block_size = {block_size}; choose fewer slots, a smaller window or a "
                f"larger chunk (cost per query ~ slots * (T / chunk - 1) + window + chunk), or set "
                f"{prefix}.allow_costlier: true")

    def build(self, spec, block_size, n_embd, n_head, dropout):
        return CompressedCausalAttention(n_embd // n_head, n_head, spec.slots, spec.chunk,
                                         spec.window, dropout)

    def forward_flops(self, spec, seq_len, n_embd, n_head):
        # As computed on the sequence padded to n = ceil(T / chunk) chunks, then per real token:
        # every chunk's queries score all (n - 1) * slots slots (masked or not: the fused kernel with
        # an explicit mask computes every score) plus window + chunk exact keys; the n - 1 completed
        # segments are pooled by three matmuls over chunk x slots x head_dim per head: the pooling
        # logits (keys @ W_P, a weight matmul) and P^T K, P^T V.
        chunk, slots = spec.chunk, spec.slots
        n = math.ceil(seq_len / chunk)
        keys = (n - 1) * slots + spec.window + chunk
        scores = 2 * 2 * n_embd * n * chunk * keys
        pooling = 2 * n_embd * slots * (n - 1) * chunk
        return CoreFlops(pooling // seq_len, (scores + 2 * pooling) // seq_len)

    def param_count(self, spec, n_embd, n_head):
        # W_P: (n_head, head_dim, slots); the compressed branch's LayerNorms for keys and values.
        return n_embd * spec.slots + 2 * 2 * (n_embd // n_head)

    def realize(self, core):
        return FullCausalAttention(core.dropout)

    def roles(self, core):
        return {name: ParamRole("compression" if name == "w_p" else "norm", factor=False, decay=False)
                for name, _ in core.named_parameters()}


ATTENTION_KINDS: dict[str, AttentionKind] = {k.name: k for k in (Full(), Compressed())}


class AttentionSpec(Strict):
    """full: exact causal softmax attention.  compressed: Transformer-LS causal attention (see
    model/attention.py): each completed segment of `chunk` positions pooled into `slots` slots by a
    content-dependent softmax, attended to in one softmax with an exact causal window that reaches
    `window` positions before the query's chunk. The config refuses settings that cost more FLOPs
    than full attention unless `allow_costlier: true`."""

    kind: Literal[tuple(ATTENTION_KINDS)] = "full"
    slots: int | None = Field(default=None, ge=1)
    chunk: int | None = Field(default=None, ge=1)
    window: int | None = Field(default=None, ge=0)
    allow_costlier: bool = False

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and data.get("kind") == "linformer":
            raise ValueError("kind 'linformer' was renamed 'compressed' (content-dependent slots, "
                             "Transformer-LS); write {kind: compressed, slots: 8, chunk: 64, window: 64}"
                             " (`k` is now `slots`)")
        return data

    @model_validator(mode="after")
    def _has_fields(self) -> "AttentionSpec":
        _needs(self.kind, self.of_kind.fields, self, "integers; window >= 0")
        return self

    @property
    def of_kind(self) -> AttentionKind:
        return ATTENTION_KINDS[self.kind]

    @property
    def approximated(self) -> bool:
        return self.kind != "full"

    def describe(self) -> str:
        return self.of_kind.describe(self)


def attention_kind_of(core: nn.Module) -> AttentionKind | None:
    return next((k for k in ATTENTION_KINDS.values() if type(core) is k.module), None)
