"""Batches as pure functions of (seed, step, micro_step, rank, world_size): no sampler state to save.

A training sample is a window of block_size + 1 consecutive tokens: x is its first block_size tokens
and y the last block_size (x shifted by one). For one (seed, step, micro_step), the token array is cut
into a grid of non-overlapping windows starting at a random phase; batch_size * world_size windows are
drawn from the grid without replacement and rank r takes the r-th slice of batch_size of them. So the
windows of one global batch never share a token, every rank can compute any step's batch (resume and
elastic restarts need nothing but the step), and the random phase lets every offset occur over steps.
"""
from __future__ import annotations

import numpy as np
import torch

# Separates the batch sampler's random stream from any other use of the same run seed.
_TRAIN_STREAM = 0x6261746368  # "batch"


def _require_tokens(tokens: np.ndarray, block_size: int, split: str) -> None:
    if len(tokens) < block_size + 1:
        raise ValueError(f"the {split} split has {len(tokens)} tokens, but block_size = {block_size} "
                         f"needs at least {block_size + 1} (x and y are a window of block_size + 1 "
                         f"tokens); use a larger corpus, a smaller block_size or, for val, a larger "
                         f"data.val_fraction")


def train_window_starts(num_tokens: int, *, seed: int, step: int, rank: int, world_size: int,
                        batch_size: int, block_size: int, micro_step: int = 0) -> np.ndarray:
    """Start offsets (batch_size,) of this rank's windows of block_size + 1 tokens."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    window = block_size + 1
    global_batch = batch_size * world_size
    num_windows = num_tokens // window
    if num_windows - 1 >= global_batch:
        num_windows -= 1  # a spare window's worth of slack lets the phase take every value < window
    if num_windows < global_batch:
        raise ValueError(f"the train split has {num_tokens} tokens: {num_windows} non-overlapping "
                         f"windows of block_size + 1 = {window}, fewer than batch_size * world_size "
                         f"= {global_batch} needed for one step")
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([_TRAIN_STREAM, seed, step, micro_step])))
    slack = num_tokens - num_windows * window  # the grid phase + k * window must end inside the array
    phase = rng.integers(min(window, slack + 1))
    windows = rng.choice(num_windows, size=global_batch, replace=False)
    return phase + windows[rank * batch_size:(rank + 1) * batch_size] * window


def _gather(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64) for s in starts])
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def train_batch(tokens: np.ndarray, *, seed: int, step: int, rank: int, world_size: int,
                batch_size: int, block_size: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), int64 (batch_size, block_size), y = x shifted by one; this rank's share of the step.

    Gradient accumulation: micro_step 0..k-1 give k independent global batches for one optimizer step.
    """
    _require_tokens(tokens, block_size, "train")
    starts = train_window_starts(len(tokens), seed=seed, step=step, rank=rank, world_size=world_size,
                                 batch_size=batch_size, block_size=block_size, micro_step=micro_step)
    return _gather(tokens, starts, block_size)


def validation_window_starts(num_tokens: int, *, block_size: int, target_tokens: int) -> np.ndarray:
    """Evenly spaced non-overlapping windows covering about target_tokens predicted tokens."""
    window = block_size + 1
    available = num_tokens // window
    wanted = min(available, max(1, target_tokens // block_size))
    return (np.arange(wanted) * available // wanted) * window


def validation_batches(tokens: np.ndarray, *, batch_size: int, block_size: int, num_tokens: int,
                       rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the same windows for every run, variant and seed (no randomness).

    About num_tokens // block_size windows (fewer if the val split is smaller), in batches of
    batch_size; the last batch may be smaller. The windows depend only on the val tokens, block_size and
    num_tokens, never on batch_size. With world_size > 1 rank r gets batches[r::world_size]: the ranks'
    shares partition the set, so the exact mean loss is
        all_reduce(sum of loss_b * rows_b) / all_reduce(sum of rows_b)
    over each rank's batches b (a rank may get no batch when there are fewer batches than ranks).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    _require_tokens(tokens, block_size, "val")
    starts = validation_window_starts(len(tokens), block_size=block_size, target_tokens=num_tokens)
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    return [_gather(tokens, batch, block_size) for batch in batches[rank::world_size]]
