"""The rank advisor: energy rank and stable rank on weights with known spectra, and on a real export."""
import json

import pytest
import torch

from distributed.export import save_final
from model import GPT, GPTConfig
from tune import rank_advisor


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
    assert rank_advisor.analyse_weight(w, 0.97)[0] == 4
    assert rank_advisor.analyse_weight(w, 1.0)[0] == 4
    assert rank_advisor.analyse_weight(w, 0.9)[1] == pytest.approx(30 / 16)


@pytest.mark.parametrize("seed", range(5))
def test_properties_on_random_weights(seed):
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(seed))
    s = torch.linalg.svdvals(w.double())
    ranks = [rank_advisor.energy_rank(s, share) for share in (0.1, 0.5, 0.9, 0.99, 1.0)]
    assert ranks == sorted(ranks) and 1 <= ranks[0] and ranks[-1] <= 24   # monotone, bounded
    k = ranks[2]
    # the chosen k keeps the share, k - 1 does not (minimality)
    energy = s ** 2
    assert energy[:k].sum() >= 0.9 * energy.sum() - 1e-9
    assert k == 1 or energy[:k - 1].sum() < 0.9 * energy.sum()
    assert 1.0 <= rank_advisor.stable_rank(s) <= 24
    # a rank-r matrix has energy rank <= r for any share
    low = w[:, :3] @ torch.randn(3, 24, generator=torch.Generator().manual_seed(seed))
    assert rank_advisor.analyse_weight(low, 1.0)[0] <= 3


def test_suggestion_maps_to_config_keys():
    ranks = [rank_advisor.WeightRank(i, site, (4, 4), 4, r, 1.0)
             for i, r in enumerate([5, 9, 13]) for site in rank_advisor.SITE_KEYS]
    suggestion = rank_advisor.suggested_ranks(ranks)
    assert suggestion["approx.mlp_fc.rank"] == 9             # median over layers
    assert suggestion["approx.attn_qkv.r1"] == suggestion["approx.attn_qkv.r2"] == 3  # 3*3 >= 9
    assert all(v >= 1 for v in suggestion.values())


def test_command_on_a_dense_export(tmp_path, capsys):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    model = GPT(config)
    with torch.no_grad():  # make block 1's MLP input weight exactly rank 2
        w = model.transformer.h[1].mlp.c_fc.weight
        w.copy_(torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]))
    save_final(model, tmp_path / "final", encoding_name="byte")
    assert rank_advisor.main([str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    weights = {(w["layer"], w["site"]): w for w in out["weights"]}
    assert len(weights) == 2 * 4
    assert weights[(1, "mlp_fc")]["energy_rank"] <= 2
    assert weights[(1, "mlp_fc")]["shape"] == [128, 32] and weights[(0, "attn_qkv")]["full_rank"] == 32
    assert weights[(0, "mlp_fc")]["energy_rank"] > 2  # random init uses most of its rank
    assert rank_advisor.main([str(tmp_path)]) == 0
    assert "approx.mlp_fc.rank=" in capsys.readouterr().out
    assert rank_advisor.main([str(tmp_path / "missing")]) == 2
