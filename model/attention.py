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
        self._mask_cache: dict = {}  # not a buffer: derived, so kept out of state_dict and ZeRO
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.e_k, mean=0.0, std=self.E_INIT_STD)
        nn.init.normal_(self.e_v, mean=0.0, std=self.E_INIT_STD)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, seq_len, head_dim = q.shape
        chunk = self.chunk
        n_chunks = math.ceil(seq_len / chunk)
        q_chunks, k_chunks, v_chunks = (self._chunks(x, n_chunks) for x in (q, k, v))

        # Every chunk's keys: its k slots, then its exact keys (window before the chunk + the chunk).
        keys = torch.cat([self._compress(k_chunks, self.e_k, seq_len), *self._local(k, k_chunks)], dim=3)
        values = torch.cat([self._compress(v_chunks, self.e_v, seq_len), *self._local(v, v_chunks)], dim=3)
        n_keys = keys.shape[3]
        # Chunks are attention "heads" of one fused SDPA call: 4-D tensors and a (1, C, chunk, n_keys)
        # mask are what PyTorch's flash kernels accept (5-D inputs or a 3-D mask fall back to the
        # unfused math path, which materialises the scores and runs ~1.6x slower on CPU).
        y = F.scaled_dot_product_attention(
            q_chunks.view(batch * heads, n_chunks, chunk, head_dim),
            keys.view(batch * heads, n_chunks, n_keys, head_dim),
            values.view(batch * heads, n_chunks, n_keys, head_dim),
            attn_mask=self._mask(n_chunks, q.device, q.dtype),
            dropout_p=self.dropout if self.training else 0.0)
        return y.view(batch, heads, n_chunks * chunk, head_dim)[:, :, :seq_len]

    def _chunks(self, x: torch.Tensor, n_chunks: int) -> torch.Tensor:
        """(B, H, T, D) -> contiguous (B, H, C, chunk, D), zero-padded at the end (one copy: q, k, v
        arrive as transposed views of the qkv projection)."""
        batch, heads, seq_len, head_dim = x.shape
        end_pad = n_chunks * self.chunk - seq_len
        if end_pad:
            x = F.pad(x, (0, 0, 0, end_pad))
        return x.reshape(batch, heads, n_chunks, self.chunk, head_dim).contiguous()

    def _local(self, x: torch.Tensor, x_chunks: torch.Tensor) -> list[torch.Tensor]:
        """Exact keys (or values) of chunk m: positions [m*chunk - window, m*chunk + chunk), as pieces
        to concatenate along dim 3 (zeros stand in for positions before 0; the mask hides them)."""
        chunk, window = self.chunk, self.window
        if window > chunk:
            # Overlapping windows longer than a chunk: cut them from the padded sequence with unfold.
            end_pad = x_chunks.shape[2] * chunk - x.shape[2]
            return [F.pad(x, (0, 0, window, end_pad)).unfold(2, window + chunk, chunk).transpose(-1, -2)]
        if window == 0:
            return [x_chunks]
        # The window is the previous chunk's tail: a slice, whose backward is cheap (unlike unfold's).
        previous_tail = F.pad(x_chunks[:, :, :-1, chunk - window:], (0, 0, 0, 0, 1, 0))
        return [previous_tail, x_chunks]

    def _compress(self, x_chunks: torch.Tensor, e: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Slots per chunk: softplus(e)-weighted mean of x over the positions before the chunk."""
        n_chunks = x_chunks.shape[2]
        end_pad = n_chunks * self.chunk - seq_len
        # fp32: the running sums cover up to block_size positions, too many to accumulate in bf16.
        weights = F.pad(F.softplus(e[:, :seq_len].float()), (0, end_pad))
        weights = weights.view(self.k, n_chunks, self.chunk).transpose(0, 1)  # (C, k, chunk)
        partial = weights @ x_chunks.float()  # (B, H, C, k, D) per-chunk weighted sums
        mass = weights.sum(-1)  # (C, k) per-chunk weight totals
        # Exclusive prefix sums: shift by one chunk (not cumsum - partial, which would let chunk m's
        # own values leak in through rounding) so chunk m only ever adds chunks 0..m-1.
        before = F.pad(partial.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n_chunks]
        mass_before = F.pad(mass.cumsum(0), (0, 0, 1, 0))[:n_chunks]
        # Chunk 0 has no past: 0 / tiny = 0 (its slots are masked anyway, and this avoids 0/0 NaNs in
        # the backward pass).
        slots = before / mass_before.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        return slots.to(x_chunks.dtype)

    def _mask(self, n_chunks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive (1, C, chunk, k + window + chunk) mask: 0 where a query may attend, -inf elsewhere.
        Cached: it depends only on the chunk count (and device, dtype), not on the data."""
        if torch.compiler.is_compiling():
            # Inside a compiled graph the mask is a constant of the graph; looking it up in the dict
            # would make dynamo guard on the cache's contents and compile the model a second time.
            return self._additive_mask(n_chunks, device, dtype)
        key = (n_chunks, device, dtype)
        if self._mask_cache.get("key") != key:
            self._mask_cache = {"key": key, "mask": self._additive_mask(n_chunks, device, dtype)}
        return self._mask_cache["mask"]

    def _additive_mask(self, n_chunks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        visible = self._visible(n_chunks, device)
        mask = torch.zeros(visible.shape, device=device, dtype=dtype)
        return mask.masked_fill_(~visible, float("-inf")).unsqueeze(0)

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
