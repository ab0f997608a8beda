"""Causal attention cores. A core maps per-head (q, k, v), each (B, n_head, T, head_dim), to the
per-head output; it never sees anything but those tensors (the projections live in
model/gpt.py's CausalSelfAttention).

`full`: exact causal softmax attention through F.scaled_dot_product_attention(is_causal=True).

`compressed`: the autoregressive long-short attention of Transformer-LS (Zhu et al., NeurIPS 2021),
causal by construction:

1. The sequence is cut into segments ("chunks") of `chunk` positions; T is padded at the END up to a
   multiple of `chunk`. Only the last chunk can hold padding, and it is never compressed (below).
2. Long range. Each COMPLETED segment i (all but the last; every position in it is real) is pooled
   into `slots` slots by a content-dependent projection, separately per head:
       P_i = softmax over the segment's positions of  rmsnorm(K_i) W_P        (chunk x slots)
       K̄_i = P_iᵀ K_i,   V̄_i = P_iᵀ V_i                                      (slots x head_dim)
   Each slot is a different, data-dependent weighted mean of the segment's keys (values). The keys
   are RMS-normalised (no parameters) before W_P so the pooling's sharpness is set by W_P alone and
   does not drift with the keys' scale; W_P starts with logits of std ~1.5, so the slots of a
   segment differ from the first step (equal slots would get equal gradients forever).
3. DualLN: the two branches get separate normalisations so the softmax compares like with like.
   A pooled key is a convex combination of keys and so shorter than a key (measured 0.5-0.7x on
   the previous core). The compressed branch applies a LayerNorm (ln_k / ln_v, over head_dim) and
   rescales it to the RMS of the exact keys (values) of the segment it summarises. The local
   branch's norm is the identity: the exact keys are what full attention uses, so realize (below)
   leaves the local path untouched and the full-rank finish starts from the trained function on
   the window (a LayerNorm on the local branch would vanish at realize and jump the loss).
4. Each query at t in chunk m attends in ONE softmax to
      - the slots of segments 0..m-1 (all completed before its chunk starts), and
      - the exact keys at positions [m*chunk - window, t] (causal inside the chunk).
   Every key it sees is at a position <= t; every slot pools positions < m*chunk <= t.
   All chunks are the "heads" of one fused SDPA call over [all (n-1)*slots slots ; window + chunk
   local keys] with an additive mask (4-D tensors and a (1, n, chunk, keys) mask are what PyTorch's
   fused CPU/GPU kernels accept; the math fallback materialises the scores).
5. Dropout acts on the attention weights after the mask, so causality holds in train mode too.

Cost per token: 2*2*d*((n-1)*slots + window + chunk) for scores and values plus 3 * 2*d*slots
(n-1)/n for the pooling (n = T/chunk), against full causal attention's 2*2*d*(T+1)/2: the slots
grow like T*slots/chunk instead of T/2 (model/kinds.py counts it; the config refuses settings that
cost more than full attention). With chunk >= T there is one chunk, no slots, and the core is
exactly full causal attention.

Realize: the core becomes FullCausalAttention; c_attn / c_proj are untouched, so the realized module
is exactly the full-attention module with the same weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FullCausalAttention(nn.Module):
    """Exact causal softmax attention (nanoGPT's flash path)."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True)


class CompressedCausalAttention(nn.Module):
    """Transformer-LS causal attention: pooled slots of completed segments + exact local window."""

    # Std of the pooling logits at init (W_P's std times sqrt(head_dim) on RMS-normalised keys):
    # large enough that each slot starts as a distinct weighted mean of its segment, small enough
    # that it does not start as a single position.
    LOGIT_INIT_STD = 1.5

    def __init__(self, head_dim: int, n_head: int, slots: int, chunk: int, window: int,
                 dropout: float):
        super().__init__()
        self.slots, self.chunk, self.window, self.dropout = slots, chunk, window, dropout
        self.w_p = nn.Parameter(torch.empty(n_head, head_dim, slots))
        self.ln_k = nn.LayerNorm(head_dim)
        self.ln_v = nn.LayerNorm(head_dim)
        self._mask_cache: dict = {}  # not a buffer: derived, so kept out of state_dict and ZeRO
        self.last_diagnostics: dict[str, torch.Tensor] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_p, mean=0.0, std=self.LOGIT_INIT_STD / math.sqrt(self.w_p.shape[1]))
        self.ln_k.reset_parameters()
        self.ln_v.reset_parameters()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, seq_len, head_dim = q.shape
        chunk = self.chunk
        n_chunks = math.ceil(seq_len / chunk)
        q_chunks, k_chunks, v_chunks = (self._chunks(x, n_chunks) for x in (q, k, v))
        keys, values = self._local(k, k_chunks), self._local(v, v_chunks)
        slot_keys = None
        if n_chunks > 1:
            slot_keys, slot_values = self._compress(k_chunks[:, :, :-1], v_chunks[:, :, :-1])
            n_slots = (n_chunks - 1) * self.slots
            # Every chunk gets every slot; the mask hides those of its own and later segments.
            keys.insert(0, slot_keys.reshape(batch, heads, 1, n_slots, head_dim)
                        .expand(-1, -1, n_chunks, -1, -1))
            values.insert(0, slot_values.reshape(batch, heads, 1, n_slots, head_dim)
                          .expand(-1, -1, n_chunks, -1, -1))
        keys, values = torch.cat(keys, dim=3), torch.cat(values, dim=3)
        n_keys = keys.shape[3]
        mask = self._mask(n_chunks, q.device, q.dtype)
        y = F.scaled_dot_product_attention(
            q_chunks.view(batch * heads, n_chunks, chunk, head_dim),
            keys.view(batch * heads, n_chunks, n_keys, head_dim),
            values.view(batch * heads, n_chunks, n_keys, head_dim),
            attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        if slot_keys is not None and not self.training and not torch.compiler.is_compiling():
            self._record_diagnostics(q_chunks[0], keys[0], slot_keys[0], mask[0], seq_len)
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

    def _compress(self, k_segments: torch.Tensor, v_segments: torch.Tensor):
        """(B, H, S, chunk, D) completed segments -> (B, H, S, slots, D) pooled keys and values."""
        head_dim = k_segments.shape[-1]
        logits = F.rms_norm(k_segments, (head_dim,)) @ self.w_p.unsqueeze(1)  # (B, H, S, chunk, slots)
        pool = logits.softmax(dim=-2).transpose(-1, -2)  # softmax over the segment's positions
        return (self._dual_norm(pool @ k_segments, k_segments, self.ln_k),
                self._dual_norm(pool @ v_segments, v_segments, self.ln_v))

    @staticmethod
    def _dual_norm(pooled: torch.Tensor, exact: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """The compressed branch's LayerNorm, at the RMS of the exact keys (values) it summarises."""
        rms = (exact.float().pow(2).mean(dim=(-2, -1), keepdim=True) + 1e-12).sqrt()
        return norm(pooled) * rms.to(pooled.dtype)

    def _mask(self, n_chunks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive (1, n, chunk, (n-1)*slots + window + chunk) mask: 0 where a query may attend,
        -inf elsewhere. Cached: it depends only on the chunk count (and device, dtype)."""
        if torch.compiler.is_compiling():
            # Inside a compiled graph the mask is a constant of the graph; looking it up in the dict
            # would make dynamo guard on the cache's contents and compile the model a second time.
            return self._additive_mask(n_chunks, device, dtype)
        key = (n_chunks, device, dtype)
        if self._mask_cache.get("key") != key:
            self._mask_cache = {"key": key, "mask": self._additive_mask(n_chunks, device, dtype)}
        return self._mask_cache["mask"]

    def _additive_mask(self, n_chunks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        visible = self.visible(n_chunks, device)
        mask = torch.zeros(visible.shape, device=device, dtype=dtype)
        return mask.masked_fill_(~visible, float("-inf")).unsqueeze(0)

    def visible(self, n_chunks: int, device: torch.device | None = None) -> torch.Tensor:
        """(n, chunk, (n-1)*slots + window + chunk) bool: which slots / exact keys each query sees."""
        chunk, window = self.chunk, self.window
        m = torch.arange(n_chunks, device=device).view(-1, 1, 1)
        query = m * chunk + torch.arange(chunk, device=device).view(1, -1, 1)  # absolute t
        key = m * chunk - window + torch.arange(window + chunk, device=device).view(1, 1, -1)  # absolute s
        local = (key >= 0) & (key <= query)
        segment = torch.arange((n_chunks - 1) * self.slots, device=device).view(1, 1, -1) // self.slots
        slots = (segment < m).expand(n_chunks, chunk, -1)
        return torch.cat([slots, local], dim=-1)

    @torch.no_grad()
    def _record_diagnostics(self, q_chunks, keys, slot_keys, mask, seq_len: int) -> None:
        """From batch element 0 of an evaluation forward: the mean pairwise cosine of a segment's
        slot keys (1 = the slots carry one direction) and the share of attention mass on slots
        (queries of chunks >= 1, which have slots to see). Kept as tensors: no device sync here."""
        heads, n_chunks, chunk, head_dim = q_chunks.shape
        diagnostics = {}
        if self.slots > 1:
            unit = F.normalize(slot_keys.float(), dim=-1)  # (H, S, slots, D)
            gram = unit @ unit.transpose(-1, -2)
            pairs = self.slots * (self.slots - 1)
            diagnostics["slot_cosine"] = ((gram.sum((-2, -1)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1))
                                          / pairs).mean()
        scores = q_chunks.float() @ keys.float().transpose(-1, -2) / math.sqrt(head_dim) + mask.float()
        slot_mass = scores.softmax(-1)[..., :(n_chunks - 1) * self.slots].sum(-1)  # (H, n, chunk)
        diagnostics["slot_mass"] = slot_mass.reshape(heads, -1)[:, chunk:seq_len].mean()
        self.last_diagnostics = diagnostics

    def diagnostics(self) -> dict[str, float]:
        return {name: value.item() for name, value in self.last_diagnostics.items()}
