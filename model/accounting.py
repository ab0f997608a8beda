"""Parameter and FLOP accounting for a GPT with approximated layers, frozen layers and growth.

FLOPs are matmul FLOPs per token (2 per multiply-add), the convention of nanoGPT's estimate_mfu and
PaLM's appendix; elementwise work (norms, GELU, softmax, biases) is left out.

Forward, per token, as each kind declares it (model/kinds.py, `forward_flops`):
- linear site: dense 2*in*out; lowrank 2*rank*(in + out); abba 2*r1*r2*(in + out).
- lm_head: 2 * n_embd * vocab_size.
- Attention is counted as computed, so that the FLOPs axis of an ablation compares what each core
  costs, not a convention:
  - full causal attention: 2 * 2 * n_embd * (T + 1) / 2 per layer (Q K^T and A V over all heads, the
    query at t seeing t + 1 keys, (T + 1) / 2 on average). Causal flash kernels (PyTorch's CPU
    kernel, FlashAttention on GPUs) skip the blocks above the diagonal, so this is their work up to
    one tile. nanoGPT's estimate_mfu and PaLM's appendix count all T keys (2 * 2 * T * n_embd), as
    does torch.utils.flop_counter: their figures are higher by that difference.
  - compressed attention: every score of every chunk's slots and local keys (masked or not: the
    fused kernel with an explicit mask computes every score) plus the pooling matmuls.

Training, per token, follows what autograd actually executes, op by op in forward order:
- a matmul with a weight costs F (forward) + F if its input needs a gradient (backward to the input)
  + F if its weight is trainable (backward to the weight);
- a matmul of two activations (attention scores and values) costs F + 2F when its inputs need a
  gradient (backward to both operands), else F.
An input needs a gradient when some trainable parameter lies before it. So a fully trainable model
costs 3x forward (the usual 6N rule); a frozen block above a trainable one costs 2x for its linears
(input gradient only) and 3x for its attention matmuls; the frozen prefix that forward runs under
torch.no_grad costs 1x; and the first trainable linear after that prefix skips its input gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from model.config import SITES
from model.kinds import full_attention_flops


@dataclass(frozen=True)
class FlopCount:
    forward: int
    training: int


@dataclass(frozen=True)
class FlopsBreakdown:
    seq_len: int
    blocks: tuple[FlopCount, ...]
    lm_head: FlopCount

    @property
    def forward(self) -> int:
        return sum(b.forward for b in self.blocks) + self.lm_head.forward

    @property
    def training(self) -> int:
        return sum(b.training for b in self.blocks) + self.lm_head.training

    def as_dict(self) -> dict:
        return {"seq_len": self.seq_len, "forward": self.forward, "training": self.training,
                "blocks": [vars(b) for b in self.blocks], "lm_head": vars(self.lm_head)}


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters counted once each (tied wte/lm_head once, wpe included, like nanoGPT's
    get_num_params(non_embedding=False))."""
    params = list(model.parameters())  # parameters() already yields a tied tensor once
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def core_flops_ratio(model: nn.Module, seq_len: int | None = None) -> list[float]:
    """Per block: forward FLOPs of its attention core over full causal attention's at seq_len."""
    config = model.config
    seq_len = config.block_size if seq_len is None else seq_len
    full = full_attention_flops(seq_len, config.n_embd)
    out = []
    for block in model.transformer.h:
        spec = block.approx.attention
        core = spec.of_kind.forward_flops(spec, seq_len, config.n_embd, config.n_head)
        out.append((core.projection + core.activation) / full)
    return out


class _Tally:
    """Accumulates forward and training FLOPs of one component, op by op."""

    def __init__(self):
        self.forward = self.training = 0

    def weight_matmul(self, flops: int, input_needs_grad: bool, weight_trainable: bool) -> None:
        self.forward += flops
        self.training += flops * (1 + int(input_needs_grad) + int(weight_trainable))

    def activation_matmul(self, flops: int, inputs_need_grad: bool) -> None:
        self.forward += flops
        self.training += flops * (1 + 2 * int(inputs_need_grad))

    def count(self) -> FlopCount:
        return FlopCount(self.forward, self.training)


def training_flops_per_token(model: nn.Module, seq_len: int | None = None) -> FlopsBreakdown:
    config = model.config
    seq_len = config.block_size if seq_len is None else seq_len
    wte, wpe = model.transformer.wte, model.transformer.wpe
    needs_grad = _trainable(wte) or _trainable(wpe)  # does the residual stream need a gradient here
    blocks = []
    for block in model.transformer.h:
        tally = _Tally()
        attn, mlp = block.attn, block.mlp
        needs_grad = needs_grad or _trainable(block.ln_1)
        approx = block.approx  # the specs this block's modules were built from

        def linear(site: str) -> int:
            spec = getattr(approx, site)
            return spec.of_kind.forward_flops(spec, *config.site_shape(site))

        tally.weight_matmul(linear("attn_qkv"), needs_grad, _trainable(attn.c_attn))
        qkv_needs_grad = needs_grad or _trainable(attn.c_attn)
        spec = approx.attention
        core = spec.of_kind.forward_flops(spec, seq_len, config.n_embd, config.n_head)
        if core.projection:
            tally.weight_matmul(core.projection, qkv_needs_grad, _trainable(attn.core))
        core_needs_grad = qkv_needs_grad or _trainable(attn.core)
        tally.activation_matmul(core.activation, core_needs_grad)
        tally.weight_matmul(linear("attn_proj"), core_needs_grad, _trainable(attn.c_proj))
        needs_grad = needs_grad or core_needs_grad or _trainable(attn.c_proj) or _trainable(block.ln_2)
        tally.weight_matmul(linear("mlp_fc"), needs_grad, _trainable(mlp.c_fc))
        hidden_needs_grad = needs_grad or _trainable(mlp.c_fc)
        tally.weight_matmul(linear("mlp_proj"), hidden_needs_grad, _trainable(mlp.c_proj))
        needs_grad = hidden_needs_grad or _trainable(mlp.c_proj)
        blocks.append(tally.count())
    head = _Tally()
    needs_grad = needs_grad or _trainable(model.transformer.ln_f)
    head.weight_matmul(2 * config.n_embd * config.vocab_size, needs_grad, _trainable(model.lm_head))
    return FlopsBreakdown(seq_len, tuple(blocks), head.count())


def summary(model: nn.Module, seq_len: int | None = None) -> str:
    """Human-readable description: per block its approximations and frozen state, then totals."""
    config = model.config
    flops = training_flops_per_token(model, seq_len)
    frozen = set(model.frozen_layers())
    ratios = core_flops_ratio(model, flops.seq_len)
    lines = [f"GPT: {model.n_blocks} blocks (target depth {config.n_layer}), n_embd={config.n_embd}, "
             f"n_head={config.n_head}, vocab={config.vocab_size}, block_size={config.block_size}",
             f"embeddings: {'frozen' if model.embeddings_frozen() else 'trainable'} (wte tied with lm_head)"]
    for i in range(model.n_blocks):
        approx = model.block_approx(i)
        sites = " ".join(f"{site}={getattr(approx, site).describe()}" for site in SITES)
        block_flops = flops.blocks[i]
        core = f" (core {ratios[i]:.3f}x full causal)" if approx.attention.approximated else ""
        lines.append(f"block {i}: {sites} attention={approx.attention.describe()}{core}"
                     f"{' [frozen]' if i in frozen else ''} | FLOPs/token fwd={block_flops.forward:,} "
                     f"train={block_flops.training:,}")
    counts = param_counts(model)
    lines.append(f"params: total={counts['total']:,} trainable={counts['trainable']:,}")
    lines.append(f"FLOPs/token at T={flops.seq_len}: forward={flops.forward:,} "
                 f"training={flops.training:,}")
    return "\n".join(lines)
