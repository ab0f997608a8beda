"""Causal self-attention with interchangeable attention cores.

`CausalSelfAttention` is nanoGPT's module (c_attn -> heads -> core -> c_proj) with its linears built by
`make_linear` and its core chosen by `AttentionSpec.kind`. A core maps per-head (q, k, v), each
(B, n_head, T, head_dim), to the per-head output; it never sees anything but those tensors.

`full`: exact causal softmax attention through F.scaled_dot_product_attention(is_causal=True).

`linformer`: a causal Linformer. Linformer compresses keys and values along the sequence with a
learned projection E (k x block_size), which mixes every position into every slot, including future
ones. Here the compression is made causal by construction:

1. The sequence is split into chunks of length `chunk`; T is padded at the END up to a multiple of
   `chunk`. Padding comes after every real token, so no real query can see it (below).
2. Compressed memory. With weights w = softplus(E) > 0, chunk m gets k slots
       slot_j(m) = sum_{s < m*chunk} w[j, s] x_s / sum_{s < m*chunk} w[j, s]          (x = k or v)
   a weighted mean over all positions strictly before the chunk starts. It is computed from
   per-chunk partial sums (O(T * k * d_head) work, O((T / chunk) * k * d_head) memory) followed by
   an EXCLUSIVE cumulative sum over chunks, so chunk m only ever adds chunks 0..m-1: no T x T matrix.
   Why a normalised, positive weighting instead of Linformer's plain E @ K: a convex combination of
   keys has the magnitude of a key wherever in the sequence it is taken, whereas a sum over
   m*chunk positions grows with m and would shift the slots' softmax temperature with position.
   Positivity also keeps the normaliser away from zero. E is shared across heads (as in Linformer),
   with separate E_k, E_v.
3. Each query at position t in chunk m attends with ONE softmax over
      - the k slots of chunk m (all masked for m = 0: there is no past), and
      - the exact keys at positions [m*chunk - window, t] (causal inside the chunk; `window` reaches
        back before the chunk start; window = 0 means the own chunk only).
   Every key a query can see is at position <= t, and every slot summarises positions < m*chunk <= t.
4. Dropout acts on the attention weights after the mask, so masked weights stay exactly zero and
   causality holds in train mode too.

Cost per token and head: (k + window + chunk) scores and values plus 2k for the compression, so the
whole layer is linear in T for fixed k, window, chunk. With chunk >= T there is a single chunk, no
slots are visible, and the core is exactly full causal attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import AttentionSpec, BlockApprox, GPTConfig
from model.linear import INIT_STD, make_linear, realize_linear, residual_init_std


class FullCausalAttention(nn.Module):
    """Exact causal softmax attention (nanoGPT's flash path)."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True)


class CausalLinformerAttention(nn.Module):
    """Chunked causal Linformer: compressed causal memory + exact local window (module docstring)."""

    # Std of E's init: softplus(N(0, 1)) spreads the slot weights over roughly an order of magnitude,
    # so the k slots start as different weighted means (with E = 0 they would be identical and, being
    # symmetric in the softmax, would receive identical gradients forever).
    E_INIT_STD = 1.0

    def __init__(self, block_size: int, k: int, window: int, chunk: int, dropout: float):
        super().__init__()
        self.k, self.window, self.chunk, self.dropout = k, window, chunk, dropout
        self.e_k = nn.Parameter(torch.empty(k, block_size))
        self.e_v = nn.Parameter(torch.empty(k, block_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.e_k, mean=0.0, std=self.E_INIT_STD)
        nn.init.normal_(self.e_v, mean=0.0, std=self.E_INIT_STD)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, seq_len, head_dim = q.shape
        chunk, window = self.chunk, self.window
        n_chunks = math.ceil(seq_len / chunk)
        end_pad = n_chunks * chunk - seq_len

        slot_k = self._compress(k, self.e_k, n_chunks)  # (B, H, C, k, D)
        slot_v = self._compress(v, self.e_v, n_chunks)

        q_chunks = F.pad(q, (0, 0, 0, end_pad)).view(batch, heads, n_chunks, chunk, head_dim)
        # Exact keys for chunk m are positions [m*chunk - window, m*chunk + chunk): pad `window` zeros at
        # the front and cut overlapping windows of length window + chunk with stride chunk. unfold
        # puts the window axis last, which is already the layout K^T needs.
        local_kt = F.pad(k, (0, 0, window, end_pad)).unfold(2, window + chunk, chunk)  # (B,H,C,D,W+L)
        local_v = F.pad(v, (0, 0, window, end_pad)).unfold(2, window + chunk, chunk).transpose(-1, -2)

        scores = torch.cat([q_chunks @ slot_k.transpose(-1, -2), q_chunks @ local_kt], dim=-1)
        scores = scores * (1.0 / math.sqrt(head_dim))
        scores = scores.masked_fill(~self._visible(n_chunks, q.device), float("-inf"))
        att = F.softmax(scores.float(), dim=-1).to(q.dtype)
        att = F.dropout(att, p=self.dropout, training=self.training)
        y = att[..., :self.k] @ slot_v + att[..., self.k:] @ local_v  # (B, H, C, L, D)
        return y.reshape(batch, heads, n_chunks * chunk, head_dim)[:, :, :seq_len]

    def _compress(self, x: torch.Tensor, e: torch.Tensor, n_chunks: int) -> torch.Tensor:
        """Slots per chunk: softplus(e)-weighted mean of x over the positions before the chunk."""
        batch, heads, seq_len, head_dim = x.shape
        end_pad = n_chunks * self.chunk - seq_len
        # fp32: the running sums cover up to block_size positions, too many to accumulate in bf16.
        weights = F.pad(F.softplus(e[:, :seq_len].float()), (0, end_pad))
        weights = weights.view(self.k, n_chunks, self.chunk)
        x_chunks = F.pad(x.float(), (0, 0, 0, end_pad)).view(batch, heads, n_chunks, self.chunk, head_dim)
        partial = torch.einsum("jcl,bhcld->bhcjd", weights, x_chunks)  # per-chunk weighted sums
        mass = weights.sum(-1).transpose(0, 1)  # (C, k) per-chunk weight totals
        # Exclusive prefix sums: shift by one chunk (not cumsum - partial, which would let chunk m's
        # own values leak in through rounding) so chunk m only ever adds chunks 0..m-1.
        before = F.pad(partial.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n_chunks]
        mass_before = F.pad(mass.cumsum(0), (0, 0, 1, 0))[:n_chunks]
        # Chunk 0 has no past: 0 / tiny = 0 (its slots are masked anyway, and this avoids 0/0 NaNs in
        # the backward pass).
        slots = before / mass_before.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        return slots.to(x.dtype)

    def _visible(self, n_chunks: int, device: torch.device) -> torch.Tensor:
        """(C, chunk, k + window + chunk) bool: which slots / exact keys each query may attend to."""
        chunk, window = self.chunk, self.window
        m = torch.arange(n_chunks, device=device).view(-1, 1, 1)
        query = m * chunk + torch.arange(chunk, device=device).view(1, -1, 1)  # absolute t
        key = m * chunk - window + torch.arange(window + chunk, device=device).view(1, 1, -1)  # absolute s
        local = (key >= 0) & (key <= query)
        slots = (m >= 1).expand(n_chunks, chunk, self.k)
        return torch.cat([slots, local], dim=-1)


def make_attention_core(spec: AttentionSpec, config: GPTConfig) -> nn.Module:
    if spec.kind == "linformer":
        return CausalLinformerAttention(config.block_size, spec.k, spec.window, spec.chunk,
                                        config.dropout)
    return FullCausalAttention(config.dropout)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention block: qkv projection, per-head core, output projection, residual dropout.

    State-dict keys match nanoGPT's (c_attn, c_proj); a linformer core adds core.e_k / core.e_v."""

    def __init__(self, config: GPTConfig, block_approx: BlockApprox):
        super().__init__()
        d = config.n_embd
        self.n_head, self.n_embd = config.n_head, d
        self.c_attn = make_linear(block_approx.attn_qkv, d, 3 * d, config.bias, INIT_STD)
        self.c_proj = make_linear(block_approx.attn_proj, d, d, config.bias,
                                  residual_init_std(config.n_layer))
        self.core = make_attention_core(block_approx.attention, config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(batch, seq_len, self.n_head, d // self.n_head).transpose(1, 2)
                   for t in (q, k, v))
        y = self.core(q, k, v).transpose(1, 2).contiguous().view(batch, seq_len, d)
        return self.resid_dropout(self.c_proj(y))

    def realize(self) -> None:
        """Dense linears and full causal attention (changes the function if the core was linformer)."""
        self.c_attn = realize_linear(self.c_attn)
        self.c_proj = realize_linear(self.c_proj)
        if not isinstance(self.core, FullCausalAttention):
            self.core = FullCausalAttention(self.core.dropout)
