"""cluster/estimate.py: per-variant training FLOPs, wall time and cost of an ablation, from the model's
FLOPs accounting over the trainer's stage plan."""
from pathlib import Path

import pytest

from cluster import estimate
from distributed.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/ablation/tiny.yaml"


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # ablation configs name their experiment relative to the repository


@pytest.fixture(scope="module")
def tiny_rows():
    import os
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        rows, context = estimate.estimate(TINY, mfu=0.5, peak_tflops=100.0, usd_per_gpu_hour=2.0)
    finally:
        os.chdir(cwd)
    return {r.variant: r for r in rows}, context


def test_dense_baseline_matches_6n_plus_attention(tiny_rows):
    rows, context = tiny_rows
    dense = rows["dense"]
    cfg = load_config("configs/experiments/tiny.yaml")
    m = cfg.model
    n_params = 12 * m.n_layer * m.n_embd ** 2 + m.n_embd * m.vocab_size  # blocks + lm_head (tied wte)
    per_token = 6 * n_params + 6 * m.n_layer * (m.block_size + 1) * m.n_embd  # causal attention
    assert dense.flops == pytest.approx(per_token * dense.tokens, rel=0.01)
    # wall time and cost follow from the stated throughput and price
    assert dense.hours == pytest.approx(dense.flops / (1 * 100e12 * 0.5) / 3600)
    assert dense.usd == pytest.approx(dense.hours * 1 * 2.0)


def test_equal_token_budget_and_every_approximation_is_cheaper(tiny_rows):
    rows, _ = tiny_rows
    variants = {name: r for name, r in rows.items() if "@" not in name}   # not the dense frontier
    assert len({round(r.tokens) for r in variants.values()}) == 1
    assert all(r.flops < rows["dense"].flops for name, r in variants.items() if name != "dense")
    # the frontier's points train the dense model on their share of the tokens
    for name, r in rows.items():
        if "@" in name:
            assert r.tokens == pytest.approx(float(name.split("@")[1]) * rows["dense"].tokens, rel=0.02)


def test_freezing_saves_the_weight_gradients_of_older_blocks(tiny_rows):
    rows, _ = tiny_rows
    for name, r in rows.items():
        if "freeze" in name:
            assert r.flops < rows[name.replace("+freeze", "")].flops


def test_cost_table_next_to_the_gpu_config_is_current():
    """configs/ablation/gpt2-124m.cost.md is what the estimator computes from the config today."""
    config = "configs/ablation/gpt2-124m.yaml"
    rows, context = estimate.estimate(config, estimate.DEFAULT_MFU, estimate.H100_BF16_PEAK_TFLOPS,
                                      estimate.DEFAULT_USD_PER_GPU_HOUR)
    written = (REPO / "configs/ablation/gpt2-124m.cost.md").read_text()
    assert written == estimate.markdown(config, rows, context), \
        "re-run: python -m cluster.estimate --config configs/ablation/gpt2-124m.yaml --write configs/ablation/gpt2-124m.cost.md"
