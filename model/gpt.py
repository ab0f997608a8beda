"""A nanoGPT-compatible GPT whose blocks can be approximated, grown, frozen and realized.

A dense model is nanoGPT's model.py: same modules, same state-dict keys, same GPT-2 initialisation,
same forward contract. On top of that:

- each block is built from its own `BlockApprox` (factorised linears, compressed attention);
- `GPT(config, n_initial_layers=n)` starts with n blocks; `config.n_layer` stays the TARGET depth,
  used for the residual-projection init scale 0.02 / sqrt(2 * n_layer) of every block, so blocks
  added later are initialised for the model they will end up in. `n_blocks` is the current count;
  `add_block` raises config.n_layer only when growing past the target.
- `add_block` appends a block whose residual output projections are zero, so the function is
  unchanged;
- `freeze_layer` / `freeze_embeddings` flip requires_grad; a frozen prefix (embeddings plus the
  leading frozen blocks) runs under torch.no_grad so it builds no autograd graph;
- `realize` makes every layer dense and every attention exact.

The model owns a deep copy of the config it was given and keeps it describing the model (growth past
the target depth, realize), so callers' config objects are never mutated.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import accounting
from model.config import ApproxConfig, BlockApprox, GPTConfig, check_block_approx
from model.kinds import (EMBEDDING, NORM, ParamRole, attention_kind_of, linear_kind_of, make_linear,
                         realize_linear, zero_output_)
from model.linear import INIT_STD, residual_init_std


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1; kept as nanoGPT's)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention block: qkv projection, per-head core, output projection, residual dropout.

    State-dict keys match nanoGPT's (c_attn, c_proj); a compressed core adds core.w_p and its norms."""

    def __init__(self, config: GPTConfig, block_approx: BlockApprox):
        super().__init__()
        d = config.n_embd
        self.n_head, self.n_embd = config.n_head, d
        self.c_attn = make_linear(block_approx.attn_qkv, d, 3 * d, config.bias, INIT_STD)
        self.c_proj = make_linear(block_approx.attn_proj, d, d, config.bias,
                                  residual_init_std(config.n_layer))
        spec = block_approx.attention
        self.core = spec.of_kind.build(spec, config.block_size, d, config.n_head, config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(batch, seq_len, self.n_head, d // self.n_head).transpose(1, 2)
                   for t in (q, k, v))
        y = self.core(q, k, v).transpose(1, 2).contiguous().view(batch, seq_len, d)
        return self.resid_dropout(self.c_proj(y))

    def realize(self) -> None:
        """Dense linears and full causal attention. A compressed core is dropped (its pooling and
        norms): the projections and the local branch are untouched, so the result is exactly the
        full-attention module with these weights, while the function changes (every past key is now
        seen exactly instead of through slots)."""
        self.c_attn = realize_linear(self.c_attn)
        self.c_proj = realize_linear(self.c_proj)
        self.core = attention_kind_of(self.core).realize(self.core)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, block_approx: BlockApprox):
        super().__init__()
        d = config.n_embd
        self.c_fc = make_linear(block_approx.mlp_fc, d, 4 * d, config.bias, INIT_STD)
        self.gelu = nn.GELU()
        self.c_proj = make_linear(block_approx.mlp_proj, 4 * d, d, config.bias,
                                  residual_init_std(config.n_layer))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    def realize(self) -> None:
        self.c_fc = realize_linear(self.c_fc)
        self.c_proj = realize_linear(self.c_proj)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, block_approx: BlockApprox):
        super().__init__()
        self.approx = block_approx  # the settings this block was built with (not a module)
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, block_approx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, block_approx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def zero_residual_outputs_(self) -> None:
        """Make the block the identity: both branches that write to the residual stream output 0."""
        zero_output_(self.attn.c_proj)
        zero_output_(self.mlp.c_proj)

    def realize(self) -> None:
        self.attn.realize()
        self.mlp.realize()
        self.approx = BlockApprox()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, n_initial_layers: int | None = None):
        super().__init__()
        self.config = config = config.model_copy(deep=True)
        n_initial = config.n_layer if n_initial_layers is None else n_initial_layers
        if not 0 <= n_initial <= config.n_layer:
            raise ValueError(f"n_initial_layers = {n_initial} must be in 0..n_layer ({config.n_layer})")
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, config.for_block(i)) for i in range(n_initial)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (https://paperswithcode.com/method/weight-tying): one tensor, two names in the
        # state dict, as in nanoGPT and GPT-2. Freezing the embeddings therefore freezes lm_head.
        self.transformer.wte.weight = self.lm_head.weight
        with torch.no_grad():
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=INIT_STD)
            nn.init.normal_(self.transformer.wpe.weight, mean=0.0, std=INIT_STD)
        # Linears were initialised by make_linear (GPT-2 std, residual projections scaled).

    # ---------------------------------------------------------------- forward / generate

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        _, seq_len = idx.size()
        if seq_len > self.config.block_size:
            raise ValueError(f"Cannot forward sequence of length {seq_len}, "
                             f"block size is only {self.config.block_size}")
        blocks = self.transformer.h
        n_prefix = self._no_grad_prefix_length()
        prefix_frozen, n_prefix = n_prefix is not None, n_prefix or 0
        # Nothing in a frozen prefix (frozen embeddings + leading frozen blocks) needs a gradient, so
        # it runs under no_grad: no graph, no saved activations. Autograd would also record nothing
        # there on its own while every prefix parameter is frozen; no_grad states the intent and does
        # not depend on that. nullcontext (not enable_grad) respects an outer torch.no_grad.
        with torch.no_grad() if prefix_frozen else contextlib.nullcontext():
            pos = torch.arange(0, seq_len, dtype=torch.long, device=idx.device)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in blocks[:n_prefix]:
                x = block(x)
        for block in blocks[n_prefix:]:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # Inference: only the last position's logits are needed (list index keeps the time dim).
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Sample max_new_tokens continuations of idx (B, T), as nanoGPT. Call model.eval() first."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # ---------------------------------------------------------------- structure

    @property
    def n_blocks(self) -> int:
        return len(self.transformer.h)

    def block_approx(self, i: int) -> BlockApprox:
        """The approximation settings block i currently uses (to rebuild the structure elsewhere)."""
        return self.transformer.h[i].approx

    def add_block(self, block_approx: BlockApprox | None = None) -> Block:
        """Append a block that leaves the model's function unchanged, and return it.

        The block uses `block_approx`, or config.for_block(new index) when None. Its attn.c_proj and
        mlp.c_proj output exactly zero (dense weight zeroed; lowrank b zeroed; abba b1 zeroed; biases
        zeroed), so x + attn(...) + mlp(...) == x bit for bit. Training is not stuck: the gradient of
        a zeroed factor is nonzero because its partner factor is not (LoRA's zero-init of B). The
        other weights are initialised normally, with the residual scale of the target depth."""
        index = self.n_blocks
        if index >= self.config.n_layer:
            self.config.n_layer = index + 1  # growing past the target depth: the config follows
        approx = self.config.for_block(index) if block_approx is None else block_approx
        check_block_approx(approx, self.config, prefix=f"block {index}")
        reference = self.transformer.wpe.weight
        block = Block(self.config, approx).to(device=reference.device, dtype=reference.dtype)
        block.zero_residual_outputs_()
        self.transformer.h.append(block)
        return block

    def realize(self) -> None:
        """Replace every factorised linear by its exact dense nn.Linear and every compressed attention
        by full causal attention; afterwards the model is a plain dense GPT and config.approx says so.

        Linears keep their function exactly (up to rounding); replacing a compressed core by full
        attention CHANGES the function (the exact attention sees every past key, not slots).
        Trainability is kept per layer (a frozen factorised layer becomes a frozen dense one); callers
        that want everything trainable unfreeze explicitly. Optimizers over the old parameters must
        be rebuilt."""
        for block in self.transformer.h:
            block.realize()
        self.config.approx = ApproxConfig()

    # ---------------------------------------------------------------- freezing

    def freeze_layer(self, i: int) -> None:
        self.transformer.h[i].requires_grad_(False)

    def unfreeze_layer(self, i: int) -> None:
        self.transformer.h[i].requires_grad_(True)

    def freeze_embeddings(self) -> None:
        """Freeze wte (and so the tied lm_head) and wpe. ln_f is not an embedding and stays trainable."""
        self.transformer.wte.requires_grad_(False)
        self.transformer.wpe.requires_grad_(False)

    def unfreeze_embeddings(self) -> None:
        self.transformer.wte.requires_grad_(True)
        self.transformer.wpe.requires_grad_(True)

    def embeddings_frozen(self) -> bool:
        return not any(p.requires_grad for m in (self.transformer.wte, self.transformer.wpe)
                       for p in m.parameters())

    def frozen_layers(self) -> list[int]:
        """Indices of blocks none of whose parameters train."""
        return [i for i, block in enumerate(self.transformer.h)
                if not any(p.requires_grad for p in block.parameters())]

    def _no_grad_prefix_length(self) -> int | None:
        """How many leading blocks run under no_grad together with the embeddings, or None when the
        embeddings train (then every activation may need a gradient)."""
        if not self.embeddings_frozen():
            return None
        frozen = set(self.frozen_layers())
        n = 0
        while n in frozen:
            n += 1
        return n

    # ---------------------------------------------------------------- optimisation & accounting

    def parameter_roles(self) -> dict[str, ParamRole]:
        """A ParamRole for every name of named_parameters(): each linear site and attention core asks
        its kind (model/kinds.py); embeddings decay, norms do not."""
        names = dict(self.named_parameters())  # the tied lm_head.weight appears once, as wte.weight
        roles: dict[str, ParamRole] = {}
        for prefix, module in self.named_modules():
            kind = linear_kind_of(module) or attention_kind_of(module)
            if kind is not None:
                local = kind.roles(module)
            elif isinstance(module, nn.Embedding):
                local = {"weight": EMBEDDING}
            elif isinstance(module, (LayerNorm, nn.LayerNorm)):
                local = {name: NORM for name, _ in module.named_parameters(recurse=False)}
            else:
                continue
            for name, role in local.items():
                full = f"{prefix}.{name}" if prefix else name
                if full in names:
                    roles.setdefault(full, role)
        missing = sorted(set(names) - set(roles))
        if missing:
            raise RuntimeError(f"parameters without a role (a module no kind declares): {missing}")
        return roles

    def decay_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decay, no_decay) over trainable parameters by their roles: dense weights, embeddings and
        factors decay; biases, norms and the compressed attention's pooling do not."""
        roles, params = self.parameter_roles(), dict(self.named_parameters())
        trainable = [name for name, p in params.items() if p.requires_grad]
        return ([params[n] for n in trainable if roles[n].decay],
                [params[n] for n in trainable if not roles[n].decay])

    def attention_diagnostics(self) -> dict[str, float]:
        """Per compressed-attention layer, from its last forward in eval mode:
        attn/slot_cosine/<layer> (mean pairwise cosine of a segment's slot keys) and
        attn/slot_mass/<layer> (share of attention mass on slots). Empty without compressed cores."""
        out = {}
        for i, block in enumerate(self.transformer.h):
            diagnostics = getattr(block.attn.core, "diagnostics", None)
            for name, value in (diagnostics() if diagnostics else {}).items():
                out[f"attn/{name}/{i}"] = value
        return out

    def param_counts(self) -> dict[str, int]:
        return accounting.param_counts(self)

    def training_flops_per_token(self, seq_len: int | None = None) -> accounting.FlopsBreakdown:
        return accounting.training_flops_per_token(self, seq_len)

    def summary(self, seq_len: int | None = None) -> str:
        return accounting.summary(self, seq_len)
