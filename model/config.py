"""Typed, validated model configuration.

`GPTConfig` keeps nanoGPT's field names so nanoGPT-style code and checkpoints carry over, and adds
`approx`: which approximation each block uses. Validation lives here, next to the shapes it checks,
so any caller (YAML loader, tests, the tune grid) gets the same one-line errors. The per-site and
attention specs, and the checks that depend on their kind, live with the kinds in model/kinds.py.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from model.kinds import AttentionSpec, LinearSpec
from common import StrictModel as _Strict

SITES = ("attn_qkv", "attn_proj", "mlp_fc", "mlp_proj")


class BlockApprox(_Strict):
    """The complete approximation settings of one transformer block."""

    attn_qkv: LinearSpec = LinearSpec()
    attn_proj: LinearSpec = LinearSpec()
    mlp_fc: LinearSpec = LinearSpec()
    mlp_proj: LinearSpec = LinearSpec()
    attention: AttentionSpec = AttentionSpec()

    @property
    def approximated(self) -> bool:
        return self.attention.approximated or any(getattr(self, s).approximated for s in SITES)


class BlockApproxOverride(_Strict):
    """Per-layer override: only the fields given replace the experiment-wide defaults."""

    attn_qkv: LinearSpec | None = None
    attn_proj: LinearSpec | None = None
    mlp_fc: LinearSpec | None = None
    mlp_proj: LinearSpec | None = None
    attention: AttentionSpec | None = None


class ApproxConfig(BlockApprox):
    """Experiment-wide block settings plus optional per-layer overrides (`layers: {2: {...}}`)."""

    layers: dict[int, BlockApproxOverride] = {}

    def for_block(self, index: int) -> BlockApprox:
        base = {name: getattr(self, name) for name in (*SITES, "attention")}
        override = self.layers.get(index)
        if override is not None:
            base.update({k: v for k, v in override if v is not None})
        return BlockApprox(**base)


class GPTConfig(_Strict):
    block_size: int = Field(default=1024, ge=1)
    vocab_size: int = Field(default=50304, ge=1)  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = Field(default=12, ge=1)
    n_head: int = Field(default=12, ge=1)
    n_embd: int = Field(default=768, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = True  # True: biases in Linears and LayerNorms, like GPT-2
    approx: ApproxConfig = ApproxConfig()

    @model_validator(mode="after")
    def _check_shapes(self) -> "GPTConfig":
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd = {self.n_embd} is not divisible by n_head = {self.n_head}; valid: "
                f"n_embd a multiple of n_head")
        for index in sorted(self.approx.layers):
            if not 0 <= index < self.n_layer:
                raise ValueError(
                    f"approx.layers.{index}: layer index out of range 0..{self.n_layer - 1}")
        for index in range(self.n_layer):
            prefix = "approx" if index not in self.approx.layers else f"approx.layers.{index}"
            check_block_approx(self.for_block(index), self, prefix)
        return self

    def for_block(self, index: int) -> BlockApprox:
        return self.approx.for_block(index)

    def site_shape(self, site: str) -> tuple[int, int]:
        """(in_features, out_features) of a linear site."""
        d = self.n_embd
        return {"attn_qkv": (d, 3 * d), "attn_proj": (d, d),
                "mlp_fc": (d, 4 * d), "mlp_proj": (4 * d, d)}[site]


def check_block_approx(block: BlockApprox, config: GPTConfig, prefix: str = "approx") -> None:
    """Raise ValueError naming the key path when a block's settings do not fit the model shape (each
    kind checks its own spec: model/kinds.py)."""
    for site in SITES:
        spec: LinearSpec = getattr(block, site)
        spec.of_kind.check(spec, *config.site_shape(site), prefix=f"{prefix}.{site}")
    att = block.attention
    att.of_kind.check(att, config.block_size, config.n_embd, config.n_head, prefix=f"{prefix}.attention")
