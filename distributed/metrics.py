"""One metrics path: a JSONL file per run, the same records to wandb, and a progress bar, on rank 0.

RUN_DIR/metrics.jsonl holds one JSON object per line; every record has `event`, `step` (optimizer
steps completed), `stage`, `attempt` (0 for the first launch, +1 per resume) and `time`:
- "train" (every step): loss, lr, tokens, flops (cumulative training FLOPs), tokens_per_s, step_time,
  peak_memory_bytes, params_total, params_trainable, grad_norm, optimizer_state_bytes;
- "eval": val_loss (plus tokens, flops), with `when`: "interval", "stage_end" or "realized" (right
  after the full-rank finish realized the model: compressed -> exact attention changes the function);
- "stage_start" / "stage_end": structure, parameter counts, optimizer_state_bytes,
  block_digests (sha256 prefixes of each block's weights, identical on every rank) ...
A resumed run appends: steps between its checkpoint and the crash appear again with a higher
`attempt`; readers keep the last record per (event, step) (see `read_metrics`).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from distributed.config import ExperimentConfig

METRICS_FILE = "metrics.jsonl"


def peak_memory_bytes() -> int:
    """Peak memory of this process: the CUDA allocator's peak on GPU, the peak RSS on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resolve_wandb_mode(mode: str) -> str:
    """'auto' is online only when an API key is configured (env var or `wandb login`'s netrc)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        has_login = "api.wandb.ai" in netrc.read_text()
    except OSError:
        has_login = False
    return "online" if has_login else "offline"


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger whose methods do nothing, so callers need no `if`."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, rank: int, start_step: int):
        self.active = rank == 0
        self.path = run_dir / METRICS_FILE
        self.attempt = _count_run_starts(self.path) if self.active else 0
        self._file = None
        self._wandb = None
        self._bar = None
        if not self.active:
            return
        self._file = open(self.path, "a", buffering=1)
        if cfg.wandb.enabled:
            self._wandb = self._init_wandb(cfg, run_dir)
        self._bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=cfg.name, unit="step",
                         dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    @staticmethod
    def _init_wandb(cfg: ExperimentConfig, run_dir: Path):
        import wandb

        # One wandb run per training run, resumed under the same id after a restart.
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.name,
                          id=run_id, resume="allow", dir=str(run_dir), mode=resolve_wandb_mode(cfg.wandb.mode),
                          config=cfg.to_yaml_dict())

    def log(self, event: str, step: int, stage: int, **values) -> dict:
        record = {"event": event, "step": step, "stage": stage, "attempt": self.attempt,
                  "time": time.time(), **values}
        if not self.active:
            return record
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            # wandb merges everything logged at one step into one history row, so the evaluation
            # right after the full-rank finish (same step as the stage-end one) needs keys of its own.
            suffix = "_realized" if values.get("when") == "realized" else ""
            numbers = {f"{event}/{k}{suffix}": v for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._wandb.log({"stage": stage, **numbers}, step=step)
        return record

    def progress(self, step: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def write(self, text: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if self.active:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._file is not None:
            self._file.close()


def _count_run_starts(path: Path) -> int:
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"event": "run_start"' in line)


def read_metrics(run_dir: str | Path, event: str | None = None) -> list[dict]:
    """The records of a run, the latest attempt's record winning for each (event, step[, when]).
    A torn last line (the writer was killed mid-line) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or record.get("event") == event:
            latest[(record.get("event"), record.get("step"), record.get("when"))] = record
    return sorted(latest.values(), key=lambda r: (r.get("step", 0), r.get("time", 0.0)))
