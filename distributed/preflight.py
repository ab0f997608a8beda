"""Everything about a training run that can be checked before the process group starts.

    preflight(cfg, run_dir, resume)      # raises PreflightError (a ConfigError): one line per problem

`load_config` checks the config on its own; this checks the config against the world it will run in:
the machine (CUDA, a C++ compiler for train.compile), the launcher (world size, local rank), the run
directory (its checkpoints, the config they were made with) and the data (the tokenizer's files, the
corpus, the splits' lengths against block_size and the batch). It runs on every rank before
`init_distributed` and before anything is written to the run directory, so a mistake costs a second
and one message, not a traceback per rank after DeepSpeed has started. The token cache is built (or
opened) here: tokenizing is the only way to know the splits' lengths, and doing it before the process
group exists means no collective can time out while a rank tokenizes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data import build_token_cache
from data.corpus import CorpusError, describe_source
from data.tokenizer import TokenizerUnavailableError, get_encoding
from distributed import checkpoint as ckpt
from distributed.config import ConfigError, ExperimentConfig

# Config sections that may change between a run and its resume (they do not affect the math).
RESUME_MUTABLE = ("name", "out_dir", "debug", "wandb", "data.cache_dir", "data.num_proc")


class PreflightError(ConfigError):
    """The config cannot run here (machine, launcher, run directory or data); nothing was started."""


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every setting that differs and changes the math (RESUME_MUTABLE aside)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if any(path == m or path.startswith(m + ".") for m in RESUME_MUTABLE):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, path + ".")
        elif a != b:
            keys.append(f"{path}: {a!r} -> {b!r}")
    return keys


def launch_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) this process will have, read before the group exists: from an
    existing group (Ray Train makes one first) or the launcher's environment (deepspeed, torchrun)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def preflight(cfg: ExperimentConfig, run_dir: str | Path, resume: bool | str = "auto") -> None:
    """Raise PreflightError naming the key or path, the value and what is valid; else return."""
    _, world_size, local_rank = launch_world()
    problems = _machine(cfg, local_rank) + _launcher(cfg, world_size)
    problems += _run_directory(cfg, Path(run_dir), resume, world_size)
    if problems:  # the data checks below take seconds (tokenizing); say the cheap problems first
        raise PreflightError("\n".join(problems))
    problems = _data(cfg, world_size)
    if problems:
        raise PreflightError("\n".join(problems))


def _machine(cfg: ExperimentConfig, local_rank: int) -> list[str]:
    ds, problems = cfg.deepspeed, []
    cuda = torch.cuda.is_available()
    if ds.backend == "nccl" and not cuda:
        problems.append("deepspeed.backend = 'nccl' needs CUDA GPUs, and this machine has none; valid "
                        "here: 'gloo' or 'auto'")
    if ds.precision == "fp16" and not cuda:
        problems.append("deepspeed.precision = 'fp16' needs a CUDA GPU (DeepSpeed's loss-scaled fp16 "
                        "optimizer), and this machine has none; valid here: 'fp32' or 'bf16'")
    if ds.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        problems.append(f"deepspeed.precision = 'bf16': {torch.cuda.get_device_name()} has no bfloat16 "
                        "support; valid here: 'fp32' or 'fp16'")
    if cuda and local_rank >= torch.cuda.device_count():
        problems.append(f"LOCAL_RANK = {local_rank}, but this machine has {torch.cuda.device_count()} "
                        "CUDA device(s); start at most that many processes per node")
    if cfg.train.compile and not cuda and not any(
            shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        problems.append("train.compile = true on CPU needs a C++ compiler (inductor builds C++ kernels), "
                        "and none is on PATH (set CXX or install g++); or set train.compile = false")
    return problems


def _launcher(cfg: ExperimentConfig, world_size: int) -> list[str]:
    problems = []
    if cfg.debug.kill_at_step is not None and cfg.debug.kill_rank >= world_size:
        problems.append(f"debug.kill_rank = {cfg.debug.kill_rank}, but the run has {world_size} "
                        f"process(es); valid: 0..{world_size - 1}")
    return problems


def _run_directory(cfg: ExperimentConfig, run_dir: Path, resume: bool | str, world_size: int) -> list[str]:
    if run_dir.exists() and not run_dir.is_dir():
        return [f"run directory {str(run_dir)!r} is a file; give a folder (--run-dir or out_dir)"]
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [f"run directory {str(run_dir)!r}: {existing} is not writable; choose another --run-dir"]
    found = ckpt.latest_checkpoint(run_dir)
    if resume is True and found is None:
        return [f"--resume: no complete checkpoint in {ckpt.checkpoint_root(run_dir)}"]
    if resume is False and found is not None:
        return [f"{run_dir} already holds checkpoints (latest {found[0]}); resume it or choose another "
                "--run-dir"]
    if found is None:
        return []
    tag, meta = found
    if meta.get("version", 1) < ckpt.FORMAT_VERSION:
        return [f"checkpoint {ckpt.checkpoint_root(run_dir) / tag} has format version {meta.get('version', 1)}; "
                f"this trainer resumes version {ckpt.FORMAT_VERSION} (its RNG files are not pickles): finish "
                "the run with the version that wrote it, or start a new --run-dir"]
    # The checkpoint carries the config it was made with; config.yaml is a copy for people to read.
    made_with = meta.get("config")
    changed = config_differences(made_with, cfg.to_yaml_dict()) if made_with is not None else []
    problems = []
    if changed:
        problems.append(f"cannot resume {run_dir} (checkpoint {tag}) with a different config: "
                        + "; ".join(changed))
    if meta["world_size"] != world_size:
        problems.append(f"{run_dir} was checkpointed with {meta['world_size']} processes; resume it with "
                        f"the same number (got {world_size})")
    return problems


def _data(cfg: ExperimentConfig, world_size: int) -> list[str]:
    data, model, train = cfg.data, cfg.model, cfg.train
    try:
        get_encoding(data.tokenizer)
    except TokenizerUnavailableError as error:
        return [f"data.tokenizer = {data.tokenizer!r}: {error}"]
    try:
        cache = build_token_cache(data)
    except CorpusError as error:
        return [f"data (source {data.source!r}): {error}"]
    except Exception as error:  # noqa: BLE001 - datasets/hub raise many types; one line, not a chain
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return [f"data (source {data.source!r}, {describe_source(data)}): cannot read the corpus "
                f"({type(error).__name__}: {first})"]
    problems = []
    if cache.vocab_size > model.vocab_size:
        problems.append(f"model.vocab_size = {model.vocab_size} is smaller than the {data.tokenizer!r} "
                        f"tokenizer's {cache.vocab_size} tokens")
    window = model.block_size + 1
    global_batch = train.micro_batch_size * world_size
    for split, tokens in (("train", len(cache.train)), ("val", len(cache.val))):
        if tokens < window:
            problems.append(
                f"data: the {split} split of {describe_source(data)} has {tokens} tokens, but model.block_size "
                f"= {model.block_size} needs at least {window} (a sample is block_size + 1 tokens); use a "
                f"larger corpus, a smaller model.block_size"
                + (" or a larger data.val_fraction" if split == "val" else ""))
    if not problems and len(cache.train) // window < global_batch:
        problems.append(
            f"data: the train split of {describe_source(data)} has {len(cache.train)} tokens, "
            f"{len(cache.train) // window} windows of block_size + 1 = {window}; one step needs "
            f"train.micro_batch_size x processes = {train.micro_batch_size} x {world_size} = {global_batch} "
            "(use a larger corpus or smaller batches)")
    return problems

