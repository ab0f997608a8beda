"""Checkpoints: DeepSpeed's engine state plus what it takes to rebuild the model's structure first.

    RUN_DIR/checkpoints/
      latest                  the newest COMPLETE tag (DeepSpeed's own pointer file, written by us)
      step0000012/
        mp_rank_00_model_states.pt, *_optim_states.pt   engine.save_checkpoint (weights, optimizer)
        rng_rank0.pt, rng_rank1.pt                       each rank's torch/numpy/python RNG states
                                                         (tensors and plain numbers only)
        manifest.json                                    size + sha256 of every file above
        approxgpt.json                                   structure, progress and the run's config,
                                                         written LAST

A tag is complete when approxgpt.json exists: it is written by rank 0 only after every rank has
finished its part and after manifest.json, and `latest` moves to the tag only after that. So a crash
at any moment leaves the previous complete checkpoint as `latest`; old tags are deleted only after a
newer one is complete, keeping the newest `train.keep_checkpoints` (>= 2). A tag being re-saved
(a resume that repeats a step) loses its approxgpt.json before anything in it is rewritten.
DeepSpeed's tools (zero_to_fp32, load_checkpoint with tag=None) read the same `latest` file.

A complete tag can still be damaged later (a full disk, a copy cut short, bit rot): resuming checks
the manifest and falls back, with a warning, to the newest complete tag whose files match it.

Resuming is: read approxgpt.json -> build_model(structure) -> freeze as recorded -> build the engine
-> engine.load_checkpoint -> restore_rng.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distributed.config import ExperimentConfig
from distributed.schedule import dense_model_config
from model import GPT, BlockApprox

FORMAT = "approxgpt-checkpoint"
FORMAT_VERSION = 2  # 2: manifest.json, the config in approxgpt.json, RNG states without pickles
META_FILE = "approxgpt.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
    """This process' RNG states as tensors and plain numbers, so they load with weights_only=True
    (a pickle in a shared run directory would run code on resume)."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
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


def read_meta(tag_dir: Path, quiet: bool = False) -> dict | None:
    """The tag's completion marker, or None when the tag is not complete. A marker that exists but
    cannot be read is said (unless `quiet`), not silently taken for an incomplete save."""
    path = tag_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        if not quiet:
            warn(f"checkpoint {tag_dir.name}: its completion marker {path} is unreadable "
                 f"({type(error).__name__}: {error}); treating the checkpoint as incomplete")
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        if not quiet:
            warn(f"checkpoint {tag_dir.name}: {path} is not an {FORMAT} marker; treating the "
                 "checkpoint as incomplete")
        return None
    return meta


def complete_tags(root: Path, quiet: bool = False) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    found = []
    if root.is_dir():
        for tag_dir in root.iterdir():
            meta = read_meta(tag_dir, quiet) if tag_dir.is_dir() else None
            if meta is not None:
                found.append((meta["step"], tag_dir.name))
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _payload_files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name not in (META_FILE, MANIFEST_FILE)
                  and not p.name.startswith("."))


def write_manifest(tag_dir: Path) -> None:
    files = {p.relative_to(tag_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _payload_files(tag_dir)}
    _write_atomic(tag_dir / MANIFEST_FILE, json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")


def verify_checkpoint(tag_dir: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256; else what is wrong."""
    try:
        files = json.loads((tag_dir / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its manifest {tag_dir / MANIFEST_FILE} is unreadable ({type(error).__name__}: {error})"
    for name, expected in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes, the manifest says {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    return None


def latest_checkpoint(run_dir: str | Path, verify: bool = False) -> tuple[str, dict] | None:
    """(tag, meta) of the checkpoint to resume from, or None when the run has none.

    `latest` names it; if `latest` is missing or names an incomplete tag (it never should: it moves
    only to complete tags), the newest complete tag is used instead. verify: also check each
    candidate's files against its manifest (reads every byte) and fall back, with a warning, past
    damaged ones to the newest intact complete tag."""
    root = checkpoint_root(run_dir)
    try:
        named = (root / LATEST_FILE).read_text().strip()
    except OSError:
        named = None
    candidates = [tag for _, tag in reversed(complete_tags(root, quiet=not verify))]
    if named in candidates:  # `latest` first, then newest to oldest
        candidates.remove(named)
        candidates.insert(0, named)
    for tag in candidates:
        meta = read_meta(root / tag, quiet=True)
        problem = verify_checkpoint(root / tag) if verify else None
        if problem is None:
            return tag, meta
        warn(f"checkpoint {tag} is damaged ({problem}); falling back to an older complete checkpoint")
    if candidates and verify:
        raise FileNotFoundError(f"every complete checkpoint in {root} is damaged (see the warnings above); "
                                "move the run directory aside and start again")
    return None


def save_checkpoint(engine, run_dir: str | Path, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it after the same step. Returns the tag directory."""
    root = checkpoint_root(run_dir)
    tag = tag_for_step(meta["step"])
    rank = dist.get_rank()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "tag": tag, "world_size": dist.get_world_size(),
            **meta}
    json.dumps(meta)  # fail before writing anything if the metadata is not serialisable
    if rank == 0:  # re-saving a tag (a resume repeats a step): it is incomplete until rewritten
        (root / tag / META_FILE).unlink(missing_ok=True)
        (root / tag / MANIFEST_FILE).unlink(missing_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"approxgpt": meta}, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk before the tag is declared complete
    if rank == 0:
        write_manifest(root / tag)
        _write_atomic(root / tag / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _write_atomic(root / LATEST_FILE, tag)
        prune(root, keep=keep, protect=tag)
    dist.barrier()  # nobody reads `latest` or reports the checkpoint before it is complete
    return root / tag


def prune(root: Path, keep: int, protect: str) -> None:
    """Delete complete tags beyond the newest `keep` and incomplete leftovers older than the newest
    complete tag (a crash mid-save). Never the tag `latest` names (`protect`)."""
    tags = complete_tags(root, quiet=True)
    newest_step = tags[-1][0] if tags else None
    for step, tag in tags[:-keep]:
        if tag != protect:
            shutil.rmtree(root / tag, ignore_errors=True)
    for tag_dir in root.iterdir():
        if tag_dir.is_dir() and read_meta(tag_dir, quiet=True) is None and tag_dir.name.startswith("step") \
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
    restore_rng(torch.load(rng_file, weights_only=True))
