"""Figure 7: Ray Tune overhead: seconds from trial start to the first training step, and trials/hour
on the tiny grid.

Measured through tune/ablation.py running distributed/train.py, the real trial path. Until the
trainer exists this reports "not measured" and says so.
"""
from __future__ import annotations

import importlib.util

from bench.report import not_measured
from bench.setups import Context

TITLE = "Ray Tune overhead: trial start to first step, trials/hour"
TARGET = "report seconds to first step and trials/hour on the tiny grid"


def run(ctx: Context) -> dict:
    missing = [m for m in ("distributed.train", "tune.ablation") if importlib.util.find_spec(m) is None]
    if missing:
        return not_measured(7, TITLE, TARGET,
                            "missing " + ", ".join(m.replace(".", "/") + ".py" for m in missing)
                            + " (the trainer is being built in parallel)")
    return not_measured(7, TITLE, TARGET, "the trainer's modules now exist, but this benchmark has "
                        "not been written against their API yet (they landed after the suite)")
