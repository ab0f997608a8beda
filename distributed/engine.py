"""The DeepSpeed side of a stage: process group, engine build/teardown, full weights, state accounting.

An engine is built over the TRAINABLE parameters only, once per stage:

    engine = build_engine(model, cfg, device, new)   # AdamW, one group per (parametrization, decay, new)
    ... train the stage ...
    state = full_state_dict(engine)            # every rank gets the full weights (ZeRO-3: gathered)
    destroy_engine(engine)                     # frees optimizer state and partitions before the next

so a frozen parameter has no optimizer state and no gradient partition on any rank. The model is
always built outside `deepspeed.zero.Init`: `deepspeed.initialize` partitions a plain module itself
(ZeRO-3), and between stages the training loop mutates a fresh plain module built from
`full_state_dict`, never a partitioned one.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from distributed.config import ExperimentConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer, which DeepSpeed never does.

    With every rank on one node (the deepspeed launcher on CPU), DeepSpeed's shared-memory all-reduce
    creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (66 MB of
    RAM) per rank and leaves it behind when the process ends, however it ends: here a day of test
    runs left 14 GB in /dev/shm, until Ray's memory monitor killed a Tune trial's workers. Every rank
    has mapped every buffer when deepspeed.init_distributed returns; after a barrier the names are no
    longer needed, and the mappings live on until the process exits."""
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    dist.barrier()  # on every rank, file or not (a single rank or several nodes: none is made)
    name.unlink(missing_ok=True)


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create) the process group and return this process' place in it.

    Works for every launcher: the deepspeed launcher and torchrun set RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_*; Ray Train has already initialised torch.distributed (reused as is); a plain
    `python -m distributed.train` is a group of one on a free local port."""
    import deepspeed

    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available() and world_size > 1:
        _unlink_shm_allreduce_buffer(rank)
    # DeepSpeed reads these even when the caller created the group (Ray Train sets them; a
    # hand-made group may not).
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Processes of one node share its cores; oversubscribed threads make every step slower.
        if "OMP_NUM_THREADS" not in os.environ:
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    return DistInfo(rank, world_size, local_rank, device)


def quiet_deepspeed_logging(rank: int) -> None:
    """DeepSpeed logs every engine build at INFO; keep warnings on rank 0, errors elsewhere."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def deepspeed_config(cfg: ExperimentConfig) -> dict:
    t, ds = cfg.train, cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.zero_stage == 3 and ds.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        # torch's AdamW is passed in (no compiled ops needed); ZeRO wraps it like its own.
        "zero_allow_untested_optimizer": True,
        # With the optimizer offloaded, that AdamW steps ZeRO's fp32 partitions in CPU memory: the
        # same math as without offload. DeepSpeed would insist on its DeepSpeedCPUAdam, a C++ op that
        # every node must first compile (minutes; a build toolchain on every node) for a faster step.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # progress and metrics are ours (distributed/metrics.py)
        "wall_clock_breakdown": False,
    }


@dataclass(frozen=True)
class ParamRole:
    parametrization: str   # "dense", "lowrank", "abba", "compression", "embedding", "norm"
    factor: bool           # a factor of a factorised weight: optimizer.factor_weight_decay applies
    decay: bool            # weight-decayed under the default policy


def parameter_roles(model: nn.Module) -> dict[str, ParamRole]:
    """Each named parameter's role. The model's own `GPT.parameter_roles()` (cross-branch contract
    item 1) when it has one; else the FALLBACK below -- the only isinstance switch on model classes
    in distributed/, to be deleted once model/ provides the method."""
    if hasattr(model, "parameter_roles"):
        return model.parameter_roles()
    from model.attention import CausalLinformerAttention
    from model.gpt import LayerNorm
    from model.linear import ABBALinear, LowRankLinear

    names = dict(model.named_parameters())  # tied weights once, under their first name
    roles: dict[str, ParamRole] = {}
    for prefix, module in model.named_modules():
        for short, _ in module.named_parameters(recurse=False):
            name = f"{prefix}.{short}" if prefix else short
            if name not in names:
                continue
            if isinstance(module, (LowRankLinear, ABBALinear)):
                kind = "lowrank" if isinstance(module, LowRankLinear) else "abba"
                roles[name] = ParamRole(kind, factor=short != "bias", decay=short != "bias")
            elif isinstance(module, CausalLinformerAttention):
                roles[name] = ParamRole("compression", factor=False, decay=False)
            elif isinstance(module, nn.Embedding):
                roles[name] = ParamRole("embedding", factor=False, decay=True)
            elif isinstance(module, LayerNorm):
                roles[name] = ParamRole("norm", factor=False, decay=False)
            elif isinstance(module, nn.Linear):
                roles[name] = ParamRole("dense", factor=False, decay=short == "weight")
            else:
                raise TypeError(f"parameter {name}: no optimizer role for {type(module).__name__}")
    return roles


def optimizer_param_groups(model: nn.Module, cfg: ExperimentConfig,
                           new: frozenset[str] = frozenset()) -> list[dict]:
    """AdamW groups over the trainable parameters, one per (parametrization, decayed, new):
    `lr_mult` from optimizer.lr_mult (embeddings and norms 1), weight decay on what the role decays
    (factors only under factor_weight_decay=decay; never on norms, biases, compression parameters),
    `new` for parameters whose Adam moments start in this stage (they get the warm-up). Groups and
    their order are a function of the model and `new`, so a resumed engine matches the saved one."""
    opt, wd = cfg.optimizer, cfg.train.weight_decay
    roles = parameter_roles(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = roles[name]
        decayed = role.decay and not (role.factor and opt.factor_weight_decay == "none")
        key = (role.parametrization, decayed, name in new)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": wd if decayed else 0.0,
                           "lr_mult": getattr(opt.lr_mult, role.parametrization, 1.0),
                           "new": name in new, "role": role.parametrization}
        groups[key]["params"].append(p)
    return list(groups.values())


def carries_optimizer_state(cfg: ExperimentConfig) -> bool:
    """Whether Adam's moments survive a stage boundary (`optimizer_moments` / `load_optimizer_moments`).
    Only without ZeRO in fp32 does the engine step torch's AdamW on the module's own parameters, with
    per-parameter state. ZeRO 1-3 and bf16/fp16 keep the moments in flat fp32 partitions that
    DeepSpeed creates at the first step and exposes no public way to seed, so there every stage
    starts fresh moments and every parameter gets the new-parameter warm-up."""
    return cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"


def optimizer_moments(engine) -> dict[str, dict]:
    """Adam's state per parameter name, on CPU (see carries_optimizer_state)."""
    optimizer = engine.optimizer
    assert isinstance(optimizer, torch.optim.AdamW), type(optimizer)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {names[id(p)]: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                           for k, v in state.items()}
            for p, state in optimizer.state.items()}


def load_optimizer_moments(engine, moments: dict[str, dict], names: frozenset[str] | set[str]) -> int:
    """Seed the fresh engine's Adam state of `names` (parameters that survive the boundary unchanged
    in shape) from `moments`; returns how many parameters were seeded."""
    if not moments:
        return 0
    optimizer = engine.optimizer
    assert isinstance(optimizer, torch.optim.AdamW), type(optimizer)
    count = 0
    for name, p in engine.module.named_parameters():
        state = moments.get(name)
        if name in names and p.requires_grad and state and state["exp_avg"].shape == p.shape:
            # torch keeps `step` on the CPU for the per-tensor AdamW: only the moments move.
            optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v.clone()
                                  for k, v in state.items()}
            count += 1
    return count


def build_engine(model: nn.Module, cfg: ExperimentConfig, device: torch.device,
                 new: frozenset[str] = frozenset()):
    """deepspeed.initialize over the model's trainable parameters with torch's AdamW."""
    import deepspeed

    model.to(device)
    t = cfg.train
    groups = optimizer_param_groups(model, cfg, new)
    # fused/foreach kernels differ between devices; the default per-tensor loop is deterministic.
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2),
                                  foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg),
                                      model_parameters=[p for g in groups for p in g["params"]])
    if t.compile:
        # The previous stage's graphs guard on a model that no longer exists; dropping them keeps
        # them from counting against dynamo's recompile limit (8 per code object) as stages add up.
        torch._dynamo.reset()
        engine.compile()  # nn.Module.compile in place: state-dict keys and ZeRO hooks unchanged
    return engine


def compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process so far (0 unless train.compile is on). A stage
    should add one for training and one for evaluation (no_grad); more means a recompilation or a
    graph break, which show up here before they show up as lost speed."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def set_learning_rate(engine, lr: float, new_factor: float = 1.0) -> None:
    """The schedule's LR times each group's multiplier, and `new_factor` (the warm-up) for groups of
    parameters whose optimizer state is new in this stage."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0) * (new_factor if group.get("new", True) else 1.0)


def destroy_engine(engine) -> None:
    """Release the engine's optimizer state, partitions and hooks before the next stage's engine."""
    engine.destroy()
    engine.optimizer = None
    engine.module = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _zero3(engine) -> bool:
    return engine.zero_optimization_partition_weights()


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's full state dict on CPU, on every rank. Collective under ZeRO-3 (all ranks call).

    With bf16/fp16 the trainable parameters come from the optimizer's fp32 master copies, so a stage
    boundary (or the final export) does not round the weights to 16 bits; frozen ones have no
    master copy and keep their module values."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    params = list(module.parameters())
    gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if _zero3(engine) \
        else contextlib.nullcontext()
    with gathered:
        values = module.state_dict(keep_vars=True)
        state = {k: v.detach().to("cpu", copy=True) for k, v in values.items()}
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        masters = {}
        for p in params:  # the same order on every rank: under ZeRO-3 each call is collective
            if p.requires_grad:
                master = safe_get_full_fp32_param(p)
                if master is not None:
                    masters[id(p)] = master.detach().to("cpu", copy=True)
        state.update({k: masters[id(v)] for k, v in values.items() if id(v) in masters})
    return state


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state held by THIS rank: Adam's moments plus any fp32 master copies the
    ZeRO optimizer keeps (its flat partitions), not counting the module's own parameters."""
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    module_params = {id(p) for p in engine.module.parameters()}
    total = 0
    # The state's keys are the tensors the optimizer updates: ZeRO's flat fp32 partitions (counted:
    # they are extra memory) or, without ZeRO, the module's parameters themselves (not counted).
    for param, state in inner.state.items():
        if id(param) not in module_params:
            total += param.numel() * param.element_size()
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


def block_digests(engine) -> dict[str, str]:
    """sha256 of each block's (and the embeddings') full parameters on this rank, keyed 'emb', '0',
    '1', ... Collective under ZeRO-3."""
    module = engine.module
    parts = {"emb": [module.transformer.wte, module.transformer.wpe]}
    parts.update({str(i): [block] for i, block in enumerate(module.transformer.h)})
    params = list(module.parameters())
    if _zero3(engine):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return _digests(parts)
    return _digests(parts)


def _digests(parts: dict[str, list[nn.Module]]) -> dict[str, str]:
    out = {}
    for key, modules in parts.items():
        h = hashlib.sha256()
        for m in modules:
            for name, p in m.named_parameters():
                h.update(name.encode())
                h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        out[key] = h.hexdigest()[:16]
    return out


def same_on_every_rank(value) -> bool:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(g == gathered[0] for g in gathered)
