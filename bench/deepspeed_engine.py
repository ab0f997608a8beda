"""Figure 6: DeepSpeed engine rebuild time at a stage boundary and optimizer-state bytes per rank,
ZeRO stages 0-3, 2 processes, with and without freezing.

Measured through distributed/train.py's own Trainer (its stage-boundary rebuild: gather the full
weights, destroy the engine, mutate a fresh model, build the next engine), so the figure is what a run
pays. One 2-process `torchrun` launch loops over the ZeRO stages and freezing on the CPU-tiny
experiment (configs/experiments/tiny.yaml, micro-batch 4): one step in the first stage, then each
growth boundary is timed and one step is taken in the new stage so Adam's state exists to be counted.

    python -m bench.deepspeed_engine --worker OUT.json   # one rank; launched by run() under torchrun
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import not_measured
from bench.setups import Context

TITLE = "DeepSpeed: engine rebuild time and optimizer-state bytes per rank (ZeRO 0-3)"
TARGET = "report rebuild seconds and optimizer-state bytes per rank, 2 processes"
REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs/experiments/tiny.yaml"
ZERO_STAGES = (0, 1, 2, 3)
PROCESSES = 2


def measure_one(zero_stage: int, freeze: bool, run_dir: Path) -> dict:
    """On this rank: rebuild times at each growth boundary and optimizer bytes in the last one."""
    import torch.distributed as dist

    from distributed.config import load_config
    from distributed.train import Trainer

    cfg = load_config(EXPERIMENT, [f"deepspeed.zero_stage={zero_stage}",
                                   f"schedule.freeze_previous={str(freeze).lower()}",
                                   "train.micro_batch_size=4", "train.checkpoint_interval=0",
                                   "wandb.enabled=false"])
    trainer = Trainer(cfg, run_dir, report=None, stop_event=None)
    try:
        trainer.prepare(resume=False)
        growth = [s for s in trainer.plan if not s.realize]  # boundaries between growth stages
        trainer._train_step(growth[0])
        rebuild_s, opt_bytes = [], []
        for stage in growth[1:]:
            dist.barrier()
            started = time.perf_counter()
            trainer._enter_stage(stage)
            dist.barrier()  # the boundary is over when the slowest rank is done
            rebuild_s.append(time.perf_counter() - started)
            trainer._train_step(stage)
            opt_bytes.append(trainer.opt_bytes)
        last = growth[-1]
        return {"zero_stage": zero_stage, "freeze": freeze, "rebuild_s": rebuild_s,
                "opt_bytes_by_stage": opt_bytes, "last_stage_blocks": last.n_blocks,
                "last_stage_frozen": len(last.frozen_blocks),
                "trainable_params": trainer.params["trainable"], "total_params": trainer.params["total"]}
    finally:
        trainer.close()


def worker(out: Path) -> None:
    import torch.distributed as dist

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ds-") as tmp:
        for zero_stage in ZERO_STAGES:
            for freeze in (False, True):
                row = measure_one(zero_stage, freeze, Path(tmp) / f"z{zero_stage}-f{int(freeze)}")
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, row)
                rows.append({**row, "opt_bytes_per_rank": [g["opt_bytes_by_stage"][-1] for g in gathered]})
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows, indent=1))


def run(ctx: Context) -> dict:
    if ctx.smoke:
        return not_measured(6, TITLE, TARGET, "skipped in smoke mode (a 2-process DeepSpeed launch)")
    with tempfile.TemporaryDirectory(prefix="bench-ds-") as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={PROCESSES}", "-m", "bench.deepspeed_engine", "--worker", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the 2-process worker failed (rc {proc.returncode}): "
                               + (proc.stdout + proc.stderr)[-2000:])
        rows = json.loads(out.read_text())

    table = []
    for r in rows:
        table.append([r["zero_stage"], "yes" if r["freeze"] else "no",
                      f"{statistics.median(r['rebuild_s']):.2f}",
                      f"{min(r['rebuild_s']):.2f} - {max(r['rebuild_s']):.2f}",
                      f"{r['last_stage_blocks']} ({r['last_stage_frozen']} frozen)",
                      f"{r['trainable_params']:,}",
                      " / ".join(f"{b / 2**20:.2f}" for b in r["opt_bytes_per_rank"])])
    by = {(r["zero_stage"], r["freeze"]): r for r in rows}
    mib = lambda z, f: by[(z, f)]["opt_bytes_per_rank"][0] / 2**20  # noqa: E731
    summary = (f"rebuild {min(statistics.median(r['rebuild_s']) for r in rows):.2f}-"
               f"{max(statistics.median(r['rebuild_s']) for r in rows):.2f} s per boundary; "
               f"optimizer state rank 0 in the 4-block stage: ZeRO-0 {mib(0, False):.2f} MiB "
               f"({mib(0, True):.2f} frozen), ZeRO-3 {mib(3, False):.2f} MiB ({mib(3, True):.2f} frozen)")
    return {
        "figure": 6, "title": TITLE, "target": TARGET, "status": "info", "summary": summary,
        "tables": [{"title": f"CPU-tiny experiment, {PROCESSES} processes (gloo, CPU), fp32, "
                             "micro-batch 4; rebuild = Trainer._enter_stage at the 1->2, 2->3, 3->4 "
                             "block boundaries; optimizer state after the first step of the 4-block stage",
                    "columns": ["ZeRO", "freeze", "rebuild s (median)", "rebuild s (range)",
                                "last stage", "trainable params", "optimizer MiB per rank (r0 / r1)"],
                    "rows": table}],
        "notes": ["Optimizer bytes are distributed.engine.optimizer_state_bytes: Adam's moments plus "
                  "any fp32 flat partitions ZeRO keeps, not the module's parameters. ZeRO-1/2/3 "
                  "partition them across the 2 ranks; freezing shrinks them to the trainable blocks.",
                  "The rebuild includes full_state_dict (a gather under ZeRO-3), destroy_engine, a "
                  "fresh model, apply_stage and deepspeed.initialize, timed between two barriers.",
                  "ZeRO-0 counts only Adam's two fp32 moments (8 B/param: the optimizer updates the "
                  "module's own parameters); ZeRO-1/2/3 add an fp32 master partition and split all "
                  "three across the ranks (12 B/param / 2 ranks = 6 B/param), hence 0.75x ZeRO-0.",
                  "All 8 settings run in one 2-process group (one launch), one after another."],
        "profiles": [], "data": {"rows": rows, "processes": PROCESSES, "device": "cpu (gloo)"},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True, help="rank 0 writes the rows here")
    worker(parser.parse_args().worker)
