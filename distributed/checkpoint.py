"""Checkpoints: DeepSpeed's engine state plus what it takes to rebuild the model's structure first.

    RUN_DIR/checkpoints/
      latest                  the newest COMPLETE tag (DeepSpeed's own pointer file, written by us)
      step0000012/
        mp_rank_00_model_states.pt, *_optim_states.pt   engine.save_checkpoint (weights, optimizer)
        rng_rank0.pt, rng_rank1.pt                       each rank's torch/numpy/python RNG states
        approxgpt.json                                   structure + progress, written LAST

A tag is complete when approxgpt.json exists: it is written by rank 0 only after every rank has
finished its part, and `latest` moves to the tag only after that. So a crash at any moment leaves the
previous complete checkpoint as `latest`; old tags are deleted only after a newer one is complete,
keeping the newest `train.keep_checkpoints` (>= 2). DeepSpeed's tools (zero_to_fp32, load_checkpoint
with tag=None) read the same `latest` file.

Resuming is: read approxgpt.json -> build_model(structure) -> freeze as recorded -> build the engine
-> engine.load_checkpoint -> restore_rng.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distributed.config import ExperimentConfig
from distributed.schedule import dense_model_config
from model import GPT, BlockApprox

FORMAT = "approxgpt-checkpoint"
FORMAT_VERSION = 1
META_FILE = "approxgpt.json"
LATEST_FILE = "latest"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step{step:07d}"


# ---------------------------------------------------------------- structure


def describe_structure(model: GPT, realized: bool) -> dict:
    """Everything besides the weights that decides the model's parameters and their trainability."""
    return {"n_blocks": model.n_blocks,
            "block_approx": [model.block_approx(i).model_dump(mode="json") for i in range(model.n_blocks)],
            "frozen_blocks": model.frozen_layers(),
            "embeddings_frozen": model.embeddings_frozen(),
            "realized": realized}


def build_model(cfg: ExperimentConfig, structure: dict) -> GPT:
    """A model with the recorded structure and freezing (weights: whatever init gives; load next).

    Built under a forked RNG so that building consumes nothing from the training random streams."""
    config = dense_model_config(cfg.model) if structure["realized"] else cfg.model
    with torch.random.fork_rng(devices=[]):
        model = GPT(config, n_initial_layers=0)
        for approx in structure["block_approx"]:
            model.add_block(BlockApprox.model_validate(approx))
    for i in structure["frozen_blocks"]:
        model.freeze_layer(i)
    if structure["embeddings_frozen"]:
        model.freeze_embeddings()
    return model


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- files


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_meta(tag_dir: Path) -> dict | None:
    try:
        meta = json.loads((tag_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


def complete_tags(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    found = []
    if root.is_dir():
        for tag_dir in root.iterdir():
            meta = read_meta(tag_dir) if tag_dir.is_dir() else None
            if meta is not None:
                found.append((meta["step"], tag_dir.name))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> tuple[str, dict] | None:
    """(tag, meta) of the checkpoint to resume from, or None when the run has none.

    `latest` names it; if `latest` is missing or names an incomplete tag (it never should: it moves
    only to complete tags), the newest complete tag is used instead."""
    root = checkpoint_root(run_dir)
    try:
        tag = (root / LATEST_FILE).read_text().strip()
    except OSError:
        tag = None
    meta = read_meta(root / tag) if tag else None
    if meta is not None:
        return tag, meta
    tags = complete_tags(root)
    if not tags:
        return None
    tag = tags[-1][1]
    return tag, read_meta(root / tag)


def save_checkpoint(engine, run_dir: str | Path, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it after the same step. Returns the tag directory."""
    root = checkpoint_root(run_dir)
    tag = tag_for_step(meta["step"])
    rank = dist.get_rank()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "tag": tag, "world_size": dist.get_world_size(),
            **meta}
    json.dumps(meta)  # fail before writing anything if the metadata is not serialisable
    engine.save_checkpoint(str(root), tag=tag, client_state={"approxgpt": meta}, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk before the tag is declared complete
    if rank == 0:
        _write_atomic(root / tag / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _write_atomic(root / LATEST_FILE, tag)
        prune(root, keep=keep, protect=tag)
    dist.barrier()  # nobody reads `latest` or reports the checkpoint before it is complete
    return root / tag


def prune(root: Path, keep: int, protect: str) -> None:
    """Delete complete tags beyond the newest `keep` and incomplete leftovers older than the newest
    complete tag (a crash mid-save). Never the tag `latest` names (`protect`)."""
    tags = complete_tags(root)
    newest_step = tags[-1][0] if tags else None
    for step, tag in tags[:-keep]:
        if tag != protect:
            shutil.rmtree(root / tag, ignore_errors=True)
    for tag_dir in root.iterdir():
        if tag_dir.is_dir() and read_meta(tag_dir) is None and tag_dir.name.startswith("step") \
                and newest_step is not None and tag_dir.name < tag_for_step(newest_step):
            shutil.rmtree(tag_dir, ignore_errors=True)


def load_checkpoint(engine, run_dir: str | Path, tag: str) -> None:
    """Collective: load the engine state of `tag` into an engine built over the recorded structure,
    then this rank's RNG states."""
    root = checkpoint_root(run_dir)
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {root}")
    rng_file = root / tag / f"rng_rank{dist.get_rank()}.pt"
    restore_rng(torch.load(rng_file, weights_only=False))
