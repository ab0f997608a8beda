"""Figure 6: DeepSpeed engine rebuild time at a stage boundary and optimizer-state bytes per rank,
ZeRO stages 0-3, 2 processes, with and without freezing.

Measured through distributed/engine.py, the trainer's own engine build, so the figure is what a run
pays. Until that module exists this reports "not measured" and says so.
"""
from __future__ import annotations

import importlib.util

from bench.report import not_measured
from bench.setups import Context

TITLE = "DeepSpeed: engine rebuild time and optimizer-state bytes per rank (ZeRO 0-3)"
TARGET = "report rebuild seconds and optimizer-state bytes per rank, 2 processes"


def run(ctx: Context) -> dict:
    missing = [m for m in ("distributed.engine", "distributed.train")
               if importlib.util.find_spec(m) is None]
    if missing:
        return not_measured(6, TITLE, TARGET,
                            "missing " + ", ".join(m.replace(".", "/") + ".py" for m in missing)
                            + " (the trainer is being built in parallel)")
    return not_measured(6, TITLE, TARGET, "the trainer's modules now exist, but this benchmark has "
                        "not been written against their API yet (they landed after the suite)")
