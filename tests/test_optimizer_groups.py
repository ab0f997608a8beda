"""AdamW's parameter groups: which parameters decay, at which LR multiplier, which warm up as new."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distributed.config import load_config
from distributed.engine import optimizer_param_groups, parameter_roles, set_learning_rate
from model import GPT

TINY = Path(__file__).resolve().parents[1] / "configs/experiments/tiny.yaml"
SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2"]


def groups_by_name(model, cfg, new=frozenset()):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in optimizer_param_groups(model, cfg, new) for p in g["params"]}


@pytest.mark.parametrize("factor_decay", ["decay", "none"])
def test_groups_decay_what_the_role_decays_at_the_parametrizations_lr(factor_decay):
    cfg = load_config(TINY, [*SMALL, f"optimizer.factor_weight_decay={factor_decay}",
                             "optimizer.lr_mult.abba=3", "optimizer.lr_mult.lowrank=1.5",
                             "optimizer.lr_mult.compression=0.5"])
    model = GPT(cfg.model)
    model.freeze_layer(0)
    by_name = groups_by_name(model, cfg)
    # Every trainable parameter in exactly one group; frozen ones in none.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(by_name) == sorted(trainable)
    assert not any(n.startswith("transformer.h.0.") for n in by_name)
    wd = cfg.train.weight_decay
    expected_mult = {"abba": 3.0, "lowrank": 1.5, "compression": 0.5}
    for name, group in by_name.items():
        short = name.rsplit(".", 1)[1]
        if ".attn.core." in name:                  # the compressed attention's projections
            assert group["weight_decay"] == 0.0 and group["role"] == "compression"
        elif short == "bias" or ".ln_" in name:    # biases and norms never decay
            assert group["weight_decay"] == 0.0
        elif short in ("a", "b", "a1", "b1", "a2", "b2"):  # factors of W = B A
            assert group["weight_decay"] == (wd if factor_decay == "decay" else 0.0)
        else:                                      # embeddings (tied with lm_head), dense weights
            assert group["weight_decay"] == wd
        assert group["lr_mult"] == expected_mult.get(group["role"], 1.0), name
    assert {g["role"] for g in by_name.values()} == {"embedding", "norm", "abba", "lowrank", "compression"}
    roles = parameter_roles(model)
    assert set(roles) == {n for n, _ in model.named_parameters()}


def test_new_parameters_get_their_own_groups_and_the_warm_up():
    cfg = load_config(TINY, [*SMALL, "approx.mlp_fc={kind: dense}", "optimizer.lr_mult.dense=2"])
    model = GPT(cfg.model)
    new = frozenset(n for n, _ in model.named_parameters() if n.startswith("transformer.h.1."))
    groups = optimizer_param_groups(model, cfg, new)
    engine = SimpleNamespace(optimizer=SimpleNamespace(param_groups=groups))  # what set_learning_rate reads
    set_learning_rate(engine, 0.01, new_factor=0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in engine.optimizer.param_groups:
        members = {names[id(p)] for p in group["params"]}
        assert members <= new if group["new"] else not members & new
        mult = 2.0 if group["role"] == "dense" else group["lr_mult"]
        assert group["lr"] == pytest.approx(0.01 * mult * (0.25 if group["new"] else 1.0))
    assert any(g["role"] == "dense" and g["lr_mult"] == 2.0 for g in groups)


@pytest.mark.parametrize("seed", range(3))
def test_factor_weight_decay_bounds_the_nuclear_norm(seed):
    """Why optimizer.factor_weight_decay exists: decay on B and A of W = B A penalises
    |B|^2 + |A|^2 >= 2 |W|_*, with equality at the balanced factorisation B = U S^1/2, A = S^1/2 V^T."""
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(24, 6, generator=g, dtype=torch.float64), torch.randn(6, 16, generator=g, dtype=torch.float64)
    w = b @ a
    nuclear = torch.linalg.matrix_norm(w, ord="nuc")
    assert b.square().sum() + a.square().sum() >= 2 * nuclear
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    bb, ab = u * s.sqrt(), s.sqrt()[:, None] * vh
    assert (bb.square().sum() + ab.square().sum()).item() == pytest.approx(2 * nuclear.item())
