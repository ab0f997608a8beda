"""Factorised linear layers: exact function and gradients, Khatri-Rao memory bound, fair init, realize."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.config import LinearSpec
from model.linear import (ABBALinear, LowRankLinear, make_linear, realize_linear, residual_init_std,
                          zero_output_)


class OutputSizeRecorder(TorchDispatchMode):
    """Records the element count of every tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _grads_through(forward, params, x):
    x = x.clone().requires_grad_(True)
    out = forward(x)
    # A fixed random cotangent exercises every output element with a different weight.
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad(out, [x, *params], cotangent)
    return out.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_matches_explicit_weight_forward_and_grads(bias):
    torch.manual_seed(0)
    layer = LowRankLinear(10, 7, rank=3, bias=bias).double()
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    params = [p for p in (layer.a, layer.b, layer.bias) if p is not None]
    x = torch.randn(4, 5, 10, dtype=torch.double)

    def explicit(inp):
        out = inp @ (layer.b @ layer.a).T
        return out + layer.bias if bias else out

    out, grads = _grads_through(layer, params, x)
    out_ref, grads_ref = _grads_through(explicit, params, x)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(layer.weight, layer.b @ layer.a)


@pytest.mark.parametrize("r1,r2", [(1, 1), (2, 3), (4, 4)])
def test_abba_matches_explicit_hadamard_weight_forward_and_grads(r1, r2):
    torch.manual_seed(0)
    layer = ABBALinear(12, 9, r1, r2).double()
    with torch.no_grad():
        layer.bias.normal_()
    params = [layer.a1, layer.b1, layer.a2, layer.b2, layer.bias]
    x = torch.randn(3, 6, 12, dtype=torch.double)

    def explicit(inp):
        weight = (layer.b1 @ layer.a1) * (layer.b2 @ layer.a2)
        return inp @ weight.T + layer.bias

    out, grads = _grads_through(layer, params, x)
    out_ref, grads_ref = _grads_through(explicit, params, x)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    a_kr, b_kr = layer.khatri_rao_factors()
    assert a_kr.shape == (r1 * r2, 12) and b_kr.shape == (9, r1 * r2)
    torch.testing.assert_close(b_kr @ a_kr, (layer.b1 @ layer.a1) * (layer.b2 @ layer.a2))


def test_abba_never_builds_an_out_by_in_tensor_in_forward_or_backward():
    n = 2048
    layer = ABBALinear(n, n, 8, 8)
    x = torch.randn(8, n, requires_grad=True)
    with OutputSizeRecorder() as recorder:
        layer(x).square().sum().backward()
    assert layer.a1.grad is not None and x.grad is not None
    assert max(recorder.numels) < n * n, max(recorder.numels)

    # The recorder is sensitive: the explicit Hadamard formula trips it, and it sees backward ops.
    with OutputSizeRecorder() as recorder:
        out = x @ ((layer.b1 @ layer.a1) * (layer.b2 @ layer.a2)).T
    assert max(recorder.numels) >= n * n
    with OutputSizeRecorder() as recorder:
        out.sum().backward()
    assert max(recorder.numels) >= n * n


SHAPES = [(1024, 1024, 1), (768, 3072, 4), (3072, 768, 16), (512, 1536, 64)]


@pytest.mark.parametrize("target", [0.02, residual_init_std(12)])
@pytest.mark.parametrize("in_features,out_features,rank", SHAPES)
def test_lowrank_init_matches_dense_std(in_features, out_features, rank, target):
    torch.manual_seed(0)
    layer = LowRankLinear(in_features, out_features, rank, init_std=target)
    std = layer.weight.std().item()
    assert abs(std / target - 1) < 0.25, (std, target)
    assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("target", [0.02, residual_init_std(12)])
@pytest.mark.parametrize("in_features,out_features,r1,r2",
                         [(1024, 1024, 1, 1), (768, 3072, 1, 8), (768, 3072, 4, 4), (3072, 768, 16, 8)])
def test_abba_init_matches_dense_std(in_features, out_features, r1, r2, target):
    torch.manual_seed(0)
    layer = ABBALinear(in_features, out_features, r1, r2, init_std=target)
    std = layer.weight.std().item()
    assert abs(std / target - 1) < 0.25, (std, target)


@pytest.mark.parametrize("layer", [LowRankLinear(16, 24, 3), ABBALinear(16, 24, 2, 3),
                                   LowRankLinear(16, 24, 3, bias=False)])
def test_realize_gives_the_exact_dense_layer(layer):
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    dense = layer.realize()
    assert type(dense) is nn.Linear
    assert (dense.bias is None) == (layer.bias is None)
    torch.testing.assert_close(dense.weight, layer.weight.detach())
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)
    assert set(dense.state_dict()) == ({"weight", "bias"} if layer.bias is not None else {"weight"})


def test_realize_keeps_trainability_and_dtype():
    layer = LowRankLinear(8, 8, 2).to(torch.bfloat16).requires_grad_(False)
    dense = layer.realize()
    assert dense.weight.dtype == torch.bfloat16
    assert not dense.weight.requires_grad and not dense.bias.requires_grad
    assert realize_linear(dense) is dense  # dense layers pass through


@pytest.mark.parametrize("spec,cls", [(LinearSpec(), nn.Linear),
                                      (LinearSpec(kind="lowrank", rank=4), LowRankLinear),
                                      (LinearSpec(kind="abba", r1=2, r2=3), ABBALinear)])
def test_make_linear_builds_each_kind_with_the_requested_init(spec, cls):
    torch.manual_seed(0)
    layer = make_linear(spec, 512, 1024, bias=True, init_std=0.01)
    assert type(layer) is cls
    assert (layer.in_features, layer.out_features) == (512, 1024)
    assert abs(layer.weight.std().item() / 0.01 - 1) < 0.25
    assert torch.count_nonzero(layer.bias) == 0
    assert make_linear(spec, 4, 6, bias=False, init_std=0.02).bias is None


@pytest.mark.parametrize("layer,zeroed,silent", [
    (nn.Linear(6, 5), "weight", []),
    (LowRankLinear(6, 5, 2), "b", ["a"]),
    (ABBALinear(6, 5, 2, 2), "b1", ["a1", "a2", "b2"]),
])
def test_zero_output_silences_the_layer_but_keeps_it_learnable(layer, zeroed, silent):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.bias.normal_()
    zero_output_(layer)
    x = torch.randn(4, 6)
    out = layer(x)
    assert torch.count_nonzero(out) == 0
    (out * torch.randn_like(out)).sum().backward()
    # The zeroed factor learns on the first step; its partners get exactly zero gradient (LoRA-style).
    assert torch.count_nonzero(getattr(layer, zeroed).grad) > 0
    for name in silent:
        assert torch.count_nonzero(getattr(layer, name).grad) == 0
    assert math.isfinite(layer.weight.sum().item())
