"""What the benchmarks run on: the run context, the model configs, and one training step.

The model configs are the project's CPU-tiny experiment (configs/experiments/tiny.yaml: 4 layers,
d=128, T=128, byte vocabulary padded to 320) and the issue's medium config (6 layers, d=256, T=256,
same vocabulary). `all_on` is each one with every approximation switched on, at the tiny experiment's
ranks for tiny and at d/4 ranks for medium.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from bench.measure import Budget
from model import GPT, GPTConfig

VOCAB = 320  # the byte tokenizer's 257 symbols padded to a multiple of 64, as configs/experiments/tiny.yaml


@dataclass(frozen=True)
class Context:
    device: torch.device
    mode: str  # "smoke" (seconds, for the test), "quick" (minutes), "full"
    budget: Budget

    @property
    def quick(self) -> bool:
        return self.mode != "full"

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"


BUDGETS = {"smoke": Budget(warmup=1, rounds=2, min_round_s=0.0),
           "quick": Budget(warmup=2, rounds=5, min_round_s=0.05),
           "full": Budget(warmup=3, rounds=11, min_round_s=0.2)}


@dataclass(frozen=True)
class ModelSetup:
    name: str
    config: GPTConfig
    batch_size: int

    @property
    def seq_len(self) -> int:
        return self.config.block_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def dense_setups(ctx: Context) -> list[ModelSetup]:
    tiny = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=VOCAB, dropout=0.0)
    medium = GPTConfig(n_layer=6, n_head=4, n_embd=256, block_size=256, vocab_size=VOCAB, dropout=0.0)
    if ctx.smoke:
        return [ModelSetup("tiny", tiny.model_copy(update={"n_layer": 2}), 4)]
    return [ModelSetup("tiny", tiny, 16), ModelSetup("medium", medium, 8)]


def all_on(config: GPTConfig, linears: bool = True, attention: bool = True) -> GPTConfig:
    """Every approximation on: ABBA attention projections, low-rank MLP, compressed attention.
    `linears=False` / `attention=False` leave that part dense, to split the speed-up by cause."""
    d, t = config.n_embd, config.block_size
    if d <= 128:  # the tiny experiment's own settings
        attn_r, mlp_rank, compressed = 8, 32, {"kind": "compressed", "slots": 2, "chunk": 16, "window": 8}
    else:  # r1 * r2 = d/4 and rank d/4, as figure 2; chunk = window = T/8, slots = chunk/8
        attn_r, mlp_rank = int((d // 4) ** 0.5), d // 4
        compressed = {"kind": "compressed", "slots": max(1, t // 64), "chunk": t // 8, "window": t // 8}
    approx = {}
    if linears:
        abba = {"kind": "abba", "r1": attn_r, "r2": attn_r}
        lowrank = {"kind": "lowrank", "rank": mlp_rank}
        approx.update(attn_qkv=abba, attn_proj=abba, mlp_fc=lowrank, mlp_proj=lowrank)
    if attention:
        approx["attention"] = compressed
    return GPTConfig.model_validate({**config.model_dump(exclude={"approx"}), "approx": approx})


def make_batch(setup: ModelSetup, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (setup.batch_size, setup.seq_len)
    idx = torch.randint(setup.config.vocab_size, shape, generator=generator)
    targets = torch.randint(setup.config.vocab_size, shape, generator=generator)
    return idx.to(device), targets.to(device)


def build_gpt(config: GPTConfig, device: torch.device, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).to(device)


def train_step(model: nn.Module, batch, autocast_dtype: torch.dtype | None = None):
    """A closure doing one training step: forward, backward, AdamW over the trainable parameters.

    AdamW is PyTorch's default (foreach) implementation with nanoGPT's hyper-parameters, the same for
    every model compared; zero_grad(set_to_none=True) as nanoGPT."""
    idx, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    device_type = idx.device.type

    def step():
        if autocast_dtype is None:
            _, loss = model(idx, targets)
        else:
            with torch.autocast(device_type=device_type, dtype=autocast_dtype):
                _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def forward_backward(model: nn.Module, batch):
    """A closure doing forward + backward only (no optimizer), for profiles and FLOP comparisons."""
    idx, targets = batch

    def step():
        _, loss = model(idx, targets)
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    return step
