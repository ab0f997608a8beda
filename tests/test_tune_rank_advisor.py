"""The rank advisor: energy ranks on known spectra, the learned update W - W0 (W0 regenerated from the
seed exactly as the trainer builds it), truncation losses, and the command on a real run directory."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from distributed.config import load_config
from distributed.export import save_final
from distributed.schedule import build_plan
from distributed.train import initial_model
from tune import rank_advisor


@pytest.fixture(autouse=True)
def _one_thread():
    # Many tiny forwards and SVDs: one intra-op thread avoids contention on a busy 2-core machine
    # (measured: 18x faster forwards with the machine at load 30).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def matrix_with_spectrum(singular_values, out_features=48, in_features=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, out_features, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=g, dtype=torch.float64))
    s = torch.zeros(out_features, in_features, dtype=torch.float64)
    s[range(len(singular_values)), range(len(singular_values))] = torch.tensor(singular_values, dtype=torch.float64)
    return u @ s @ v.T


def test_energy_rank_on_a_known_spectrum():
    # energies 16, 9, 4, 1 (total 30): top 1 keeps 53%, top 2 83%, top 3 97%
    w = matrix_with_spectrum([4.0, 3.0, 2.0, 1.0])
    assert rank_advisor.analyse_weight(w, 0.5)[0] == 1
    assert rank_advisor.analyse_weight(w, 0.9)[0] == 3
    assert rank_advisor.analyse_weight(w, 1.0)[0] == 4
    assert rank_advisor.analyse_weight(w, 0.9)[1] == pytest.approx(30 / 16)


@pytest.mark.parametrize("seed", range(3))
def test_the_update_of_a_rank_8_training_reads_8_where_w_reads_noise(seed):
    """W = W0 + (rank-8 update), W0 GPT-2's N(0, 0.02) init of a 384x128 weight: the spectrum of W
    needs most of its 128 directions (the noise), the update exactly 8."""
    g = torch.Generator().manual_seed(seed)
    w0 = 0.02 * torch.randn(384, 128, generator=g, dtype=torch.float64)
    update = matrix_with_spectrum([0.3] * 8, 384, 128, seed=seed)   # comparable to W0's norm
    trained = {"transformer.h.0.mlp.c_fc.weight": w0 + update}
    initial = {"transformer.h.0.mlp.c_fc.weight": w0}
    (w,) = rank_advisor.update_ranks(trained, initial, share=0.9)
    assert w.update_energy_rank == 8
    assert 7.5 < w.update_stable_rank <= 8.0
    assert w.init_energy_rank > 80 and w.energy_rank > 8   # W alone overstates the rank needed


def test_truncation_loss_is_zero_at_the_true_rank_and_grows_below_it():
    torch.manual_seed(0)
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)).eval()
    with torch.no_grad():
        for block in model.transformer.h:   # an exactly rank-3 MLP input weight, large enough to matter
            w = block.mlp.c_fc.weight
            w.copy_(torch.randn(w.shape[0], 3) @ torch.randn(3, w.shape[1]))
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    batches = [(x, torch.roll(x, -1, dims=1))]
    losses = rank_advisor.truncation_losses(model, batches, "mlp_fc", [1, 3, 8])
    assert abs(losses[3]) < 1e-5 and abs(losses[8]) < 1e-5
    assert losses[1] > 1e-3
    before = model.transformer.h[0].mlp.c_fc.weight.clone()
    assert torch.equal(before, model.transformer.h[0].mlp.c_fc.weight)   # weights restored
    grid = rank_advisor.propose_grid({1: 2.0, 2: 0.4, 4: 0.1, 8: 0.01, 16: 0.0}, 3, limit=12)
    assert grid == [2, 4, 8]
    assert max(rank_advisor.propose_grid({1: 2.0, 64: 0.0}, 3, limit=12)) <= 12


def test_initial_model_regenerates_w0_from_the_seed(tmp_path):
    """W0 for the advisor comes from the run's config alone, and is the trainer's own init."""
    cfg = load_config("configs/experiments/tiny.yaml", ["approx={}", "model.n_layer=2",
                                                       "model.n_embd=32", "model.n_head=2"])
    plan = build_plan(cfg)
    a, b = initial_model(cfg, plan), initial_model(cfg, plan)
    other = initial_model(cfg.model_copy(update={"seed": cfg.seed + 1}), plan)
    key = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], other.state_dict()[key])


def test_command_on_a_dense_run(tmp_path, capsys):
    import argparse

    (tmp_path / "corpus.txt").write_text(Path(argparse.__file__).read_text())   # a small corpus
    cfg = load_config("configs/experiments/tiny.yaml",
                      ["approx={}", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
                       "model.block_size=32", "schedule.layerwise=false", "schedule.freeze_previous=false",
                       "schedule.full_rank_finish=false", "data.val_tokens=1024", "data.source=files",
                       f"data.path={tmp_path / 'corpus.txt'}", f"data.cache_dir={tmp_path / 'cache'}",
                       "data.val_fraction=0.1"])
    plan = build_plan(cfg)
    model = initial_model(cfg, plan)
    with torch.no_grad():   # "training" added a rank-2 update to block 1's MLP input weight
        w = model.transformer.h[1].mlp.c_fc.weight
        w.add_(torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]))
    run = tmp_path / "run"
    save_final(model, run / "final", encoding_name="byte")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    assert rank_advisor.main([str(run), "--json", "--ranks", "1,2"]) == 0
    out = json.loads(capsys.readouterr().out)
    weights = {(w["layer"], w["site"]): w for w in out["weights"]}
    assert weights[(1, "mlp_fc")]["update_energy_rank"] <= 2
    assert weights[(0, "mlp_fc")]["update_energy_rank"] == 0   # untouched: W == W0
    assert weights[(0, "mlp_fc")]["energy_rank"] > 2             # the init noise
    assert set(out["truncation_loss_increase"]) == {"attn_qkv", "attn_proj", "mlp_fc", "mlp_proj"}
    # the grids it proposes to the rank search: inside 1..break-even - 1, with a prediction each
    from types import SimpleNamespace

    from tune.rank_search import load_rank_search

    config = load_rank_search("configs/rank_search/tiny.yaml")
    evens = {"attn_qkv": 5, "attn_proj": 5, "mlp_fc": 20, "mlp_proj": 20, "attention": 5}
    grids, advice = rank_advisor.advise_sweep(run, config, SimpleNamespace(break_even=evens))
    assert set(grids) == {"attn_qkv", "attn_proj", "mlp_fc", "mlp_proj"}   # attention: no weight
    for site, grid in grids.items():
        assert grid and 1 <= min(grid) and max(grid) < evens[site]
        assert all(str(k) in advice[site] for k in grid)
    assert rank_advisor.main([str(tmp_path / "missing")]) == 2
    assert rank_advisor.main([str(run), "--share", "2"]) == 2
