"""Small pure helpers of the ablation report (the statistics are in tune/stats.py, the dense
frontier in tune/frontier.py)."""
from __future__ import annotations

import math

import numpy as np


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (flops, loss), both minimised; sorted by flops.
    Points with a NaN coordinate are neither on the front nor allowed to hide one."""
    finite = [i for i, (f, l) in enumerate(points) if not (math.isnan(f) or math.isnan(l))]
    order = sorted(finite, key=lambda i: (points[i][0], points[i][1]))
    front, best_loss = [], math.inf
    for i in order:
        if points[i][1] < best_loss:
            front.append(i)
            best_loss = points[i][1]
    return front


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the empirical token distribution: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens).ravel().astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
