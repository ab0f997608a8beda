"""Batches: pure functions of (seed, step, micro_step, rank, world_size); a fixed validation set."""
import numpy as np
import pytest
import torch

from data import train_batch, validation_batches

# Token i has value i, so a batch's values are the positions it was cut from.
TOKENS = np.arange(100_000, dtype=np.uint32)
B, T = 4, 32


def batch(**overrides):
    args = dict(seed=0, step=0, rank=0, world_size=1, batch_size=B, block_size=T)
    return train_batch(TOKENS, **{**args, **overrides})


def positions(x: torch.Tensor, y: torch.Tensor) -> list[set]:
    return [set(row_x.tolist()) | set(row_y.tolist()) for row_x, row_y in zip(x, y)]


def test_batch_shape_dtype_and_y_is_x_shifted():
    x, y = batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # the window is contiguous in the token array
    assert torch.equal(x, torch.from_numpy(np.stack([TOKENS[s:s + T] for s in x[:, 0].tolist()])).long())


def test_same_inputs_give_identical_batches():
    for args in [dict(), dict(seed=3, step=17, rank=2, world_size=4, micro_step=1)]:
        first, second = batch(**args), batch(**args)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("change", [dict(step=1), dict(seed=1), dict(micro_step=1), dict(rank=1)])
def test_each_input_changes_the_batch(change):
    base = dict(world_size=2)
    assert not torch.equal(batch(**base)[0], batch(**{**base, **change})[0])


def test_ranks_of_a_step_draw_disjoint_windows():
    world_size = 8
    for step in range(50):
        seen = set()
        for rank in range(world_size):
            for window in positions(*batch(seed=5, step=step, rank=rank, world_size=world_size)):
                assert len(window) == T + 1
                assert not (window & seen), f"step {step}: rank {rank} overlaps another window"
                seen |= window


def test_window_starts_cover_every_phase_over_steps():
    starts = {s % (T + 1) for step in range(300) for s in batch(step=step)[0][:, 0].tolist()}
    assert len(starts) == T + 1


def test_memmap_uint16_input(tmp_path):
    path = tmp_path / "tokens.bin"
    (np.arange(5000) % 257).astype(np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = train_batch(tokens, seed=0, step=0, rank=0, world_size=1, batch_size=2, block_size=8)
    assert x.dtype == torch.int64 and torch.equal(y[:, :-1], x[:, 1:])


def test_smallest_possible_train_split_works_and_one_less_token_fails():
    tokens = np.arange(T + 1, dtype=np.uint16)
    x, y = train_batch(tokens, seed=0, step=9, rank=0, world_size=1, batch_size=1, block_size=T)
    assert x.tolist() == [list(range(T))] and y.tolist() == [list(range(1, T + 1))]
    with pytest.raises(ValueError, match=rf"train split has {T} tokens.*needs at least {T + 1}"):
        train_batch(tokens[:T], seed=0, step=0, rank=0, world_size=1, batch_size=1, block_size=T)


def test_too_few_windows_for_the_global_batch_is_an_error():
    tokens = np.arange(10 * (T + 1), dtype=np.uint16)
    with pytest.raises(ValueError, match=r"10 non-overlapping windows.*= 12"):
        train_batch(tokens, seed=0, step=0, rank=0, world_size=3, batch_size=4, block_size=T)


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        batch(rank=2, world_size=2)


def validation_starts(batches) -> list[int]:
    return [s for x, _ in batches for s in x[:, 0].tolist()]


def test_validation_set_is_fixed_evenly_spaced_and_non_overlapping():
    batches = validation_batches(TOKENS, batch_size=3, block_size=T, num_tokens=640)
    again = validation_batches(TOKENS, batch_size=3, block_size=T, num_tokens=640)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    starts = validation_starts(batches)
    assert len(starts) == 640 // T
    gaps = np.diff(starts)
    assert (gaps >= T + 1).all() and gaps.max() - gaps.min() <= T + 1  # non-overlapping, evenly spread
    assert starts[-1] > len(TOKENS) * 0.9  # spans the whole split, not just its start
    for x, y in batches:
        assert torch.equal(y[:, :-1], x[:, 1:])
    assert [len(x) for x, _ in batches] == [3] * 6 + [2]


def test_validation_windows_do_not_depend_on_batch_size():
    small = validation_starts(validation_batches(TOKENS, batch_size=3, block_size=T, num_tokens=640))
    large = validation_starts(validation_batches(TOKENS, batch_size=16, block_size=T, num_tokens=640))
    assert small == large


def test_validation_shards_partition_the_set():
    full = validation_batches(TOKENS, batch_size=2, block_size=T, num_tokens=20 * T)
    for world_size in (1, 3, 16):
        shards = [validation_batches(TOKENS, batch_size=2, block_size=T, num_tokens=20 * T,
                                     rank=r, world_size=world_size) for r in range(world_size)]
        merged = sorted(s for shard in shards for s in validation_starts(shard))
        assert merged == validation_starts(full)
    assert shards[15] == []  # more ranks than batches: a rank may get none


def test_validation_set_is_capped_by_the_split_and_needs_one_window():
    tokens = np.arange(5 * (T + 1), dtype=np.uint16)
    assert len(validation_starts(validation_batches(tokens, batch_size=8, block_size=T, num_tokens=10**6))) == 5
    with pytest.raises(ValueError, match=rf"val split has {T} tokens.*at least {T + 1}"):
        validation_batches(tokens[:T], batch_size=8, block_size=T, num_tokens=100)
