"""Causal attention cores: the Linformer variant is causal by construction, computes what the module
docstring says, and stays linear in T; the causality check itself is shown to catch a leak."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model import GPT, GPTConfig
from model.attention import CausalLinformerAttention, CausalSelfAttention, FullCausalAttention
from model.config import AttentionSpec, BlockApprox

N_EMBD, N_HEAD, BLOCK = 16, 2, 24


def attention_module(spec: AttentionSpec, dropout: float = 0.0, block_size: int = BLOCK):
    config = GPTConfig(block_size=block_size, vocab_size=32, n_layer=2, n_head=N_HEAD, n_embd=N_EMBD,
                       dropout=dropout)
    torch.manual_seed(0)
    return CausalSelfAttention(config, BlockApprox(attention=spec)).double()


def run(module, x, seed=1234):
    torch.manual_seed(seed)  # same dropout masks on every call
    return module(x)


def earliest_leak(module, x) -> int | None:
    """Smallest t such that changing the input at t changes some output before t (None: causal)."""
    base = run(module, x)
    for t in range(1, x.shape[1]):
        perturbed = x.clone()
        perturbed[:, t] += torch.randn_like(perturbed[:, t])
        out = run(module, perturbed)
        if not torch.equal(out[:, :t], base[:, :t]):
            return t
        # Non-vacuous: the perturbation does reach position t itself.
        assert not torch.equal(out[:, t], base[:, t])
    return None


# (T, k, window, chunk): T multiple of chunk or not, window 0 / inside / beyond a chunk, chunk > T.
SETTINGS = [(13, 3, 0, 4), (13, 2, 5, 4), (16, 4, 3, 8), (7, 2, 0, 7), (5, 3, 2, 8), (24, 4, 4, 5),
            (11, 1, 0, 1)]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("T,k,window,chunk", SETTINGS)
def test_linformer_future_inputs_never_change_past_outputs(T, k, window, chunk, train):
    module = attention_module(AttentionSpec(kind="linformer", k=k, window=window, chunk=chunk),
                              dropout=0.3 if train else 0.0)
    module.train(train)
    x = torch.randn(2, T, N_EMBD, dtype=torch.double)
    assert earliest_leak(module, x) is None


@pytest.mark.parametrize("train", [False, True])
def test_full_attention_is_causal(train):
    module = attention_module(AttentionSpec(kind="full"), dropout=0.3 if train else 0.0).train(train)
    assert earliest_leak(module, torch.randn(2, 13, N_EMBD, dtype=torch.double)) is None


@pytest.mark.parametrize("train", [False, True])
def test_linformer_jacobian_is_exactly_zero_above_the_diagonal(train):
    T = 11
    module = attention_module(AttentionSpec(kind="linformer", k=2, window=2, chunk=3),
                              dropout=0.3 if train else 0.0).train(train)
    x = torch.randn(1, T, N_EMBD, dtype=torch.double)
    jac = torch.autograd.functional.jacobian(lambda inp: run(module, inp), x)[0, :, :, 0]  # (T,C,T,C)
    for s in range(T):
        for t in range(T):
            block = jac[s, :, t, :]
            if t > s:
                assert torch.count_nonzero(block) == 0, (s, t)
    # Information does flow backwards in time: within the window and through the compressed slots
    # (s = 10 is in chunk 3; t = 0 is outside its window [7, 10], so only slots connect them).
    assert torch.count_nonzero(jac[10, :, 8, :]) > 0
    assert torch.count_nonzero(jac[10, :, 0, :]) > 0


class NaiveLinformer(nn.Module):
    """Linformer as published, plus a causal-looking mask: project K, V along the whole sequence to k
    slots, and let query t see slot j only when j <= t * k / T. Still leaks: every slot mixes every
    position."""

    def __init__(self, k: int, block_size: int):
        super().__init__()
        self.k = k
        self.e = nn.Parameter(torch.randn(k, block_size, dtype=torch.double) / math.sqrt(k))

    def forward(self, q, key, v):
        T = q.shape[2]
        e = self.e[:, :T]
        scores = q @ (e @ key).transpose(-1, -2) / math.sqrt(q.shape[-1])
        visible = torch.arange(self.k).view(1, -1) <= torch.arange(T).view(-1, 1) * self.k / T
        att = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return att @ (e @ v)


def test_causality_check_detects_a_non_causal_linformer():
    module = attention_module(AttentionSpec(kind="full"))
    module.core = NaiveLinformer(k=4, block_size=BLOCK)
    assert earliest_leak(module, torch.randn(2, 13, N_EMBD, dtype=torch.double)) is not None


def reference_linformer(core: CausalLinformerAttention, q, k, v):
    """The construction of model/attention.py's docstring, one query at a time, straight from it."""
    T, D = q.shape[2], q.shape[3]
    w_k, w_v = F.softplus(core.e_k[:, :T]), F.softplus(core.e_v[:, :T])
    out = torch.zeros_like(q)
    for t in range(T):
        start = (t // core.chunk) * core.chunk
        keys, values = [], []
        if start > 0:  # slots: weighted means over positions < chunk start
            keys.append(w_k[:, :start] @ k[..., :start, :] / w_k[:, :start].sum(1, keepdim=True))
            values.append(w_v[:, :start] @ v[..., :start, :] / w_v[:, :start].sum(1, keepdim=True))
        low = max(0, start - core.window)
        keys.append(k[..., low:t + 1, :])
        values.append(v[..., low:t + 1, :])
        scores = q[..., t:t + 1, :] @ torch.cat(keys, -2).transpose(-1, -2) / math.sqrt(D)
        out[..., t:t + 1, :] = scores.softmax(-1) @ torch.cat(values, -2)
    return out


@pytest.mark.parametrize("T,k,window,chunk", SETTINGS)
def test_linformer_computes_the_documented_construction(T, k, window, chunk):
    torch.manual_seed(0)
    core = CausalLinformerAttention(BLOCK, k, window, chunk, dropout=0.0).double()
    q, key, v = (torch.randn(2, 3, T, 4, dtype=torch.double) for _ in range(3))
    torch.testing.assert_close(core(q, key, v), reference_linformer(core, q, key, v))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_linformer_fused_kernel_path_matches_the_construction(dtype, tol):
    """Training runs in float32 or bf16: there the core must compute the same construction through
    PyTorch's fused SDPA kernel (not the unfused math fallback that materialises the scores)."""
    torch.manual_seed(0)
    T, k, window, chunk = 20, 3, 4, 8
    core = CausalLinformerAttention(BLOCK, k, window, chunk, dropout=0.0)
    inputs = [torch.randn(2, 3, T, 16, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(2, 3, T, 16)
    expected = reference_linformer(core, *inputs)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    with torch.no_grad():
        core_low = CausalLinformerAttention(BLOCK, k, window, chunk, dropout=0.0)
        core_low.load_state_dict(core.state_dict())
    low = [x.detach().to(dtype).requires_grad_() for x in inputs]
    with torch.profiler.profile() as profiler:
        out = core_low.to(dtype)(*low)
    ops = {event.key for event in profiler.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops
    grads = torch.autograd.grad(out, low, grad_out.to(dtype))
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.float(), want, atol=tol * 10, rtol=tol * 10)


def test_linformer_with_one_chunk_is_full_causal_attention():
    # chunk >= T: one chunk, no past to compress, every causal key exact -> exactly full attention.
    torch.manual_seed(0)
    core = CausalLinformerAttention(BLOCK, k=4, window=0, chunk=BLOCK, dropout=0.0).double()
    for T in (1, 9, BLOCK):
        q, key, v = (torch.randn(2, 3, T, 4, dtype=torch.double) for _ in range(3))
        torch.testing.assert_close(core(q, key, v), FullCausalAttention(0.0)(q, key, v))


class LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.largest = max([self.largest] + [t.numel() for t in tree_leaves(out)
                                             if isinstance(t, torch.Tensor)])
        return out


def test_linformer_memory_is_linear_in_sequence_length():
    core = CausalLinformerAttention(512, k=8, window=16, chunk=16, dropout=0.0)
    largest = {}
    for T in (256, 512):
        q, key, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
        with LargestOutput() as recorder:
            core(q, key, v).sum().backward()
        largest[T] = recorder.largest
    assert largest[256] < 256 * 256  # no T x T score matrix, not even for one head
    assert largest[512] <= 2 * largest[256] + 2 * 8 * 512  # doubling T doubles memory (+ E's size)


def test_linformer_runs_for_every_length_up_to_block_size():
    module = attention_module(AttentionSpec(kind="linformer", k=3, window=2, chunk=5)).eval()
    for T in range(1, BLOCK + 1):
        out = module(torch.randn(1, T, N_EMBD, dtype=torch.double))
        assert out.shape == (1, T, N_EMBD) and torch.isfinite(out).all()


@pytest.mark.parametrize("attention", [AttentionSpec(kind="full"),
                                       AttentionSpec(kind="linformer", k=3, window=2, chunk=4)])
def test_whole_model_logits_are_causal_in_train_mode(attention):
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.2,
                       approx={"attention": attention})
    torch.manual_seed(0)
    model = GPT(config).train()
    idx = torch.randint(0, 32, (2, 14))
    targets = torch.zeros_like(idx)
    torch.manual_seed(5)
    base, _ = model(idx, targets)
    for t in (1, 4, 9, 13):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 32
        torch.manual_seed(5)
        logits, _ = model(changed, targets)
        assert torch.equal(logits[:, :t], base[:, :t])
        assert not torch.equal(logits[:, t], base[:, t])
