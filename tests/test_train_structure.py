"""Single-process pieces of the trainer: stage mutations, structure metadata, checkpoint bookkeeping."""
import json
from pathlib import Path

import pytest
import torch

from distributed import checkpoint as ckpt
from distributed.config import load_config
from distributed.schedule import build_plan
from distributed.preflight import config_differences
from distributed.train import apply_stage, block_seed
from model import GPT

TINY = Path(__file__).resolve().parents[1] / "configs/experiments/tiny.yaml"
SMALL = ["model.n_layer=3", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
         "approx.attn_qkv={kind: abba, r1: 4, r2: 4}", "approx.attn_proj={kind: abba, r1: 4, r2: 4}",
         "approx.mlp_fc={kind: lowrank, rank: 8}", "approx.mlp_proj={kind: lowrank, rank: 8}",
         "approx.attention={kind: compressed, slots: 4, chunk: 8, window: 4, allow_costlier: true}",
         "schedule.freeze_embeddings=true", "train.max_steps=12", "train.warmup_steps=2"]


@pytest.fixture
def cfg():
    return load_config(TINY, SMALL)


def walk(cfg, upto: int) -> GPT:
    plan = build_plan(cfg)
    torch.manual_seed(0)
    model = GPT(cfg.model, n_initial_layers=plan[0].n_blocks)
    for stage in plan[:upto + 1]:
        apply_stage(model, stage, cfg.seed)
    return model


def test_apply_stage_gives_each_stage_its_structure_and_trainability(cfg):
    plan = build_plan(cfg)
    for stage in plan:
        model = walk(cfg, stage.index)
        assert model.n_blocks == stage.n_blocks
        assert model.frozen_layers() == list(stage.frozen_blocks)
        assert model.embeddings_frozen() == stage.embeddings_frozen
        assert all(p.requires_grad for p in model.transformer.ln_f.parameters())
        approximated = any(model.block_approx(i).approximated for i in range(model.n_blocks))
        assert approximated != stage.realize


def test_growth_is_function_preserving_and_block_init_is_reproducible(cfg):
    plan = build_plan(cfg)
    model = walk(cfg, 0)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    before, _ = model(x)
    apply_stage(model, plan[1], cfg.seed)
    after, _ = model(x)
    assert torch.equal(before, after)
    # The new block's weights depend only on (seed, index), not on the RNG state when it is added.
    torch.manual_seed(123)
    again = walk(cfg, 1)
    for a, b in zip(model.transformer.h[1].parameters(), again.transformer.h[1].parameters()):
        assert torch.equal(a, b)
    assert block_seed(cfg.seed, 1) != block_seed(cfg.seed, 2) != block_seed(cfg.seed + 1, 1)


@pytest.mark.parametrize("stage_index", [1, 3])
def test_structure_metadata_rebuilds_the_same_model(cfg, stage_index):
    model = walk(cfg, stage_index)
    realized = build_plan(cfg)[stage_index].realize
    structure = json.loads(json.dumps(ckpt.describe_structure(model, realized)))
    rebuilt = ckpt.build_model(cfg, structure)
    assert rebuilt.load_state_dict(model.state_dict()) is not None  # strict: same keys and shapes
    assert rebuilt.frozen_layers() == model.frozen_layers()
    assert rebuilt.embeddings_frozen() == model.embeddings_frozen()
    assert [p.requires_grad for p in rebuilt.parameters()] == [p.requires_grad for p in model.parameters()]
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    assert torch.equal(rebuilt(x)[0], model(x)[0])


def test_building_from_metadata_consumes_no_training_randomness(cfg):
    structure = ckpt.describe_structure(walk(cfg, 2), realized=False)
    torch.manual_seed(5)
    ckpt.build_model(cfg, structure)
    assert torch.equal(torch.rand(3), (torch.manual_seed(5), torch.rand(3))[1])


def _fake_tag(root: Path, step: int, complete: bool) -> None:
    tag_dir = root / ckpt.tag_for_step(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag_dir / ckpt.META_FILE).write_text(json.dumps({"format": ckpt.FORMAT, "step": step}))


def test_latest_checkpoint_only_ever_names_a_complete_tag(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path) is None
    _fake_tag(root, 4, complete=True)
    _fake_tag(root, 8, complete=False)  # a save killed half-way
    (root / ckpt.LATEST_FILE).write_text(ckpt.tag_for_step(8))
    tag, meta = ckpt.latest_checkpoint(tmp_path)
    assert tag == ckpt.tag_for_step(4) and meta["step"] == 4


def test_prune_keeps_the_newest_complete_tags_and_drops_crash_leftovers(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for step in (2, 4, 6, 8):
        _fake_tag(root, step, complete=True)
    _fake_tag(root, 5, complete=False)   # older than the newest complete tag: garbage
    _fake_tag(root, 10, complete=False)  # newer: possibly being written right now, kept
    ckpt.prune(root, keep=2, protect=ckpt.tag_for_step(8))
    left = sorted(p.name for p in root.iterdir())
    assert left == [ckpt.tag_for_step(s) for s in (6, 8, 10)]


def test_resume_rejects_config_changes_that_change_the_math():
    old = {"seed": 1, "out_dir": "a", "train": {"max_steps": 10, "lr": 1.0},
           "debug": {"kill_at_step": 3}, "data": {"cache_dir": "/x", "path": "p"}}
    new = {"seed": 1, "out_dir": "b", "train": {"max_steps": 12, "lr": 1.0},
           "debug": {"kill_at_step": None}, "data": {"cache_dir": "/y", "path": "p"}}
    assert config_differences(old, new) == ["train.max_steps: 10 -> 12"]


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state too
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_manifest_catches_truncation_and_bit_flips_and_resume_falls_back(tmp_path, capsys):
    root = ckpt.checkpoint_root(tmp_path)
    for step in (4, 8):
        _fake_tag(root, step, complete=True)
        (root / ckpt.tag_for_step(step) / "rng_rank0.pt").write_bytes(bytes(range(200)))
        ckpt.write_manifest(root / ckpt.tag_for_step(step))
    (root / ckpt.LATEST_FILE).write_text(ckpt.tag_for_step(8))
    newest = root / ckpt.tag_for_step(8)
    assert ckpt.verify_checkpoint(newest) is None
    assert ckpt.latest_checkpoint(tmp_path, verify=True)[0] == ckpt.tag_for_step(8)

    flipped = bytearray((newest / "rng_rank0.pt").read_bytes())
    flipped[7] ^= 1
    (newest / "rng_rank0.pt").write_bytes(bytes(flipped))
    assert "sha256" in ckpt.verify_checkpoint(newest)
    (newest / "rng_rank0.pt").write_bytes(bytes(flipped[:50]))
    assert "has 50 bytes" in ckpt.verify_checkpoint(newest)
    tag, meta = ckpt.latest_checkpoint(tmp_path, verify=True)
    assert tag == ckpt.tag_for_step(4) and meta["step"] == 4
    assert f"checkpoint {ckpt.tag_for_step(8)} is damaged" in capsys.readouterr().err

    (root / ckpt.tag_for_step(4) / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="every complete checkpoint"):
        ckpt.latest_checkpoint(tmp_path, verify=True)


def test_an_unreadable_completion_marker_is_said(tmp_path, capsys):
    root = ckpt.checkpoint_root(tmp_path)
    for step in (4, 8):
        _fake_tag(root, step, complete=True)
        ckpt.write_manifest(root / ckpt.tag_for_step(step))
    (root / ckpt.tag_for_step(8) / ckpt.META_FILE).write_text('{"format": "approxg')  # cut short
    tag, _ = ckpt.latest_checkpoint(tmp_path, verify=True)
    assert tag == ckpt.tag_for_step(4)
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt.tag_for_step(8)}: its completion marker" in err and "unreadable" in err
