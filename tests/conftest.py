"""Shared fixtures: a tiny trainer experiment (config + local corpus) for the multi-process tests."""
import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Three blocks grown one per stage, older blocks and embeddings frozen, then the full-rank finish:
# stages of 3 steps each (steps 1-3, 4-6, 7-9, 10-12), every approximation on.
TINY_TRAINER = {
    "name": "trainer-test", "seed": 7,
    "model": {"n_layer": 3, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0, "bias": True},
    "approx": {"attn_qkv": {"kind": "abba", "r1": 4, "r2": 4},
               "attn_proj": {"kind": "abba", "r1": 4, "r2": 4},
               "mlp_fc": {"kind": "lowrank", "rank": 8}, "mlp_proj": {"kind": "lowrank", "rank": 8},
               "attention": {"kind": "compressed", "slots": 4, "chunk": 8, "window": 4, "allow_costlier": True}},
    "data": {"source": "files", "tokenizer": "byte", "val_fraction": 0.1, "val_tokens": 1024},
    "schedule": {"layerwise": True, "initial_layers": 1, "freeze_previous": True,
                 "freeze_embeddings": True, "full_rank_finish": True, "finish_fraction": 0.25,
                 "rewarmup_steps": 1, "growth_fraction": None},
    "train": {"max_steps": 12, "micro_batch_size": 4, "grad_accum_steps": 2, "learning_rate": 3e-3,
              "min_lr": 3e-4, "warmup_steps": 2, "eval_interval": 5, "checkpoint_interval": 4,
              "log_interval": 1},  # a train record per step: exact-resume tests compare every loss
    # threshold 0: ZeRO-3 partitions even these tiny tensors instead of keeping them whole
    "deepspeed": {"zero_stage": 2, "precision": "fp32", "param_persistence_threshold": 0},
}


@pytest.fixture(scope="session")
def tiny_trainer_config(tmp_path_factory) -> Path:
    """A YAML file for TINY_TRAINER with a ~150 KB corpus of standard-library source."""
    folder = tmp_path_factory.mktemp("tiny-trainer")
    stdlib = Path(argparse.__file__).parent
    text = "".join((stdlib / name).read_text() for name in
                   ("argparse.py", "textwrap.py", "shlex.py", "glob.py", "fnmatch.py"))
    (folder / "corpus.txt").write_text(text)
    raw = yaml.safe_load(yaml.safe_dump(TINY_TRAINER))
    raw["data"].update(path=str(folder / "corpus.txt"), cache_dir=str(folder / "cache"))
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env() -> dict:
    # One thread per process: 2 ranks on 2 cores, and the same thread count (same float results)
    # in a run and its resume.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline",
            "WANDB_SILENT": "true"}


def launch_trainer(config: Path, run_dir: Path, *overrides: str, nprocs: int = 2,
                   timeout: float = 240) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module distributed.train ...` (on CPU the launcher starts N processes)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
           "--module", "distributed.train", "--config", str(config), "--run-dir", str(run_dir),
           *overrides]
    return subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True,
                          timeout=timeout)
