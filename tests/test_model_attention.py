"""Causal attention cores: the compressed (Transformer-LS) core is causal by construction, pools
completed segments by their content, computes what the module docstring says through the fused
kernel, and realizes to exactly full attention; the causality check itself is shown to catch a leak."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig
from model.attention import CompressedCausalAttention, FullCausalAttention
from model.config import ApproxConfig, AttentionSpec, BlockApprox
from model.gpt import CausalSelfAttention

N_EMBD, N_HEAD, BLOCK = 16, 2, 24


def compressed(slots, chunk, window) -> AttentionSpec:
    return AttentionSpec(kind="compressed", slots=slots, chunk=chunk, window=window, allow_costlier=True)


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


# (T, slots, chunk, window): T a multiple of chunk or not, window 0 / inside / beyond a chunk, one
# slot or several (chunk >= T, no slots at all: test_compressed_with_one_chunk_is_full_causal_attention).
SETTINGS = [(13, 3, 4, 0), (13, 2, 4, 5), (16, 4, 8, 3), (23, 4, 5, 4), (11, 1, 2, 1)]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("T,slots,chunk,window", SETTINGS)
def test_compressed_future_inputs_never_change_past_outputs(T, slots, chunk, window, train):
    module = attention_module(compressed(slots, chunk, window), dropout=0.3 if train else 0.0)
    module.train(train)
    assert earliest_leak(module, torch.randn(2, T, N_EMBD, dtype=torch.double)) is None


@pytest.mark.parametrize("train", [False, True])
def test_full_attention_is_causal(train):
    module = attention_module(AttentionSpec(kind="full"), dropout=0.3 if train else 0.0).train(train)
    assert earliest_leak(module, torch.randn(2, 13, N_EMBD, dtype=torch.double)) is None


@pytest.mark.parametrize("T,slots,chunk,window,train", [(7, 2, 2, 1, False), (8, 1, 2, 3, True)])
def test_compressed_jacobian_is_exactly_zero_above_the_diagonal(T, slots, chunk, window, train):
    module = attention_module(compressed(slots, chunk, window), dropout=0.3 if train else 0.0).train(train)
    x = torch.randn(1, T, N_EMBD, dtype=torch.double)
    jac = torch.autograd.functional.jacobian(lambda inp: run(module, inp), x)[0, :, :, 0]  # (T,C,T,C)
    for s in range(T):
        for t in range(s + 1, T):
            assert torch.count_nonzero(jac[s, :, t, :]) == 0, (s, t)
    # Information does flow backwards in time, also from outside the window through the slots:
    # the last query's chunk starts at m*chunk, its window at m*chunk - window > 0.
    last = T - 1
    assert torch.count_nonzero(jac[last, :, 0, :]) > 0
    assert 0 < (last // chunk) * chunk - window


def test_output_depends_on_the_contents_of_completed_past_segments_not_future_ones():
    """Outside the local window a query sees the past only through the slots; the slots pool by
    content, so changing what a completed segment holds changes the query's output."""
    slots, chunk, window, T = 2, 4, 0, 12
    module = attention_module(compressed(slots, chunk, window)).eval()
    x = torch.randn(1, T, N_EMBD, dtype=torch.double)
    base = module(x)
    past = x.clone()
    past[:, 0:chunk] = torch.randn(1, chunk, N_EMBD, dtype=torch.double)  # segment 0: outside t=8's window
    assert not torch.allclose(module(past)[:, 8:], base[:, 8:])
    future = x.clone()
    future[:, 9:] = torch.randn(1, T - 9, N_EMBD, dtype=torch.double)
    assert torch.equal(module(future)[:, :9], base[:, :9])
    # Content, not position: swapping two positions inside segment 0 changes nothing for t = 8 when
    # the pooling is symmetric in positions, which this check shows it is (softmax over the
    # segment's positions of a function of the key alone).
    swapped = x.clone()
    swapped[:, [0, 1]] = x[:, [1, 0]]
    wpe_free = module(swapped)[:, 8:]
    torch.testing.assert_close(wpe_free, base[:, 8:])


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


def reference_compressed(core: CompressedCausalAttention, q, k, v):
    """The construction of model/attention.py's docstring, one query at a time, straight from it."""
    T, D = q.shape[2], q.shape[3]
    chunk = core.chunk

    def pooled(x, norm, start, end, pool):
        exact = x[..., start:end, :]
        rms = exact.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
        return norm(pool @ exact) * rms

    out = torch.zeros_like(q)
    for t in range(T):
        start = (t // chunk) * chunk
        keys, values = [], []
        for seg in range(t // chunk):  # completed segments before the query's own
            s, e = seg * chunk, (seg + 1) * chunk
            logits = F.rms_norm(k[..., s:e, :], (D,)) @ core.w_p.unsqueeze(0)  # (B, H, chunk, slots)
            pool = logits.softmax(-2).transpose(-1, -2)
            keys.append(pooled(k, core.ln_k, s, e, pool))
            values.append(pooled(v, core.ln_v, s, e, pool))
        low = max(0, start - core.window)
        keys.append(k[..., low:t + 1, :])
        values.append(v[..., low:t + 1, :])
        scores = q[..., t:t + 1, :] @ torch.cat(keys, -2).transpose(-1, -2) / math.sqrt(D)
        out[..., t:t + 1, :] = scores.softmax(-1) @ torch.cat(values, -2)
    return out


def core_with_random_norms(slots, chunk, window, dtype=torch.double):
    torch.manual_seed(0)
    core = CompressedCausalAttention(4, 3, slots, chunk, window, dropout=0.0).to(dtype)
    with torch.no_grad():  # non-trivial DualLN affine parameters, so the test sees them act
        for p in (*core.ln_k.parameters(), *core.ln_v.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    return core


@pytest.mark.parametrize("T,slots,chunk,window", SETTINGS)
def test_compressed_computes_the_documented_construction(T, slots, chunk, window):
    core = core_with_random_norms(slots, chunk, window)
    q, key, v = (torch.randn(2, 3, T, 4, dtype=torch.double) for _ in range(3))
    torch.testing.assert_close(core(q, key, v), reference_compressed(core, q, key, v))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_compressed_fused_kernel_path_matches_the_construction(dtype, tol):
    """Training runs in float32 or bf16: there the core must compute the same construction through
    PyTorch's fused SDPA kernel (not the unfused math fallback that materialises the scores)."""
    T, slots, chunk, window = 20, 3, 8, 4
    core = core_with_random_norms(slots, chunk, window, torch.float32)
    inputs = [torch.randn(2, 3, T, 4, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(2, 3, T, 4)
    expected = reference_compressed(core, *inputs)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    low = [x.detach().to(dtype).requires_grad_() for x in inputs]
    core = core.to(dtype)
    with torch.profiler.profile() as profiler:
        out = core(*low)
    ops = {event.key for event in profiler.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops
    grads = torch.autograd.grad(out, low, grad_out.to(dtype))
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.float(), want, atol=tol * 10, rtol=tol * 10)


def test_compressed_with_one_chunk_is_full_causal_attention():
    # chunk >= T: one chunk, no completed segment to pool, every causal key exact.
    core = core_with_random_norms(slots=4, chunk=BLOCK, window=0)
    for T in (1, 9, BLOCK):
        q, key, v = (torch.randn(2, 3, T, 4, dtype=torch.double) for _ in range(3))
        torch.testing.assert_close(core(q, key, v), FullCausalAttention(0.0)(q, key, v))


def test_realize_gives_exactly_the_full_attention_module_with_the_same_weights():
    module = attention_module(compressed(2, 4, 2))
    full = attention_module(AttentionSpec(kind="full"))
    module.realize()
    assert isinstance(module.core, FullCausalAttention) and not list(module.core.parameters())
    full.load_state_dict(module.state_dict(), strict=True)  # same keys: c_attn, c_proj only
    x = torch.randn(2, 13, N_EMBD, dtype=torch.double)
    assert torch.equal(module(x), full(x))


def test_compressed_runs_for_every_length_up_to_block_size():
    module = attention_module(compressed(3, 5, 2)).eval()
    for T in range(1, BLOCK + 1):
        out = module(torch.randn(1, T, N_EMBD, dtype=torch.double))
        assert out.shape == (1, T, N_EMBD) and torch.isfinite(out).all()


def test_attention_diagnostics_per_layer_from_the_last_eval_forward():
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16,
                       approx={"attention": compressed(3, 4, 2)})
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, 32, (2, 16))
    model.train()(idx, idx)
    assert model.attention_diagnostics() == {}  # training forwards record nothing
    model.eval()(idx, idx)
    diagnostics = model.attention_diagnostics()
    assert set(diagnostics) == {f"attn/{name}/{i}" for name in ("slot_cosine", "slot_mass") for i in (0, 1)}
    assert all(-1 <= diagnostics[f"attn/slot_cosine/{i}"] < 0.99 for i in (0, 1))  # distinct at init
    assert all(0 < diagnostics[f"attn/slot_mass/{i}"] < 1 for i in (0, 1))
    dense = GPT(config.model_copy(update={"approx": ApproxConfig()})).eval()
    dense(idx, idx)
    assert dense.attention_diagnostics() == {}


@pytest.mark.parametrize("attention", [AttentionSpec(kind="full"), compressed(3, 4, 2)])
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
