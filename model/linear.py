"""Linear layers whose weight is stored in factorised form, and the factory that builds any site.

Two factorisations, both of an out x in weight W:

- LowRankLinear:  W = b @ a                      a: (rank, in), b: (out, rank)
- ABBALinear:     W = (b1 @ a1) * (b2 @ a2)       Hadamard product of two low-rank terms, so rank(W)
                                                  can reach r1 * r2 with only (r1 + r2)(in + out) params

Neither ever builds W in forward or backward; `weight` materialises it for inspection and `realize()`
turns the layer into the exact dense nn.Linear it represents (used for the full-rank finish).

Initialisation is fair to the ablation: the dense weight a factorised layer represents at init has the
same element std as the dense layer it replaces would have had (GPT-2's 0.02, or the residual-scaled
0.02 / sqrt(2 * n_layer)). Derivations are next to the code that uses them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

INIT_STD = 0.02  # GPT-2's std for every linear and embedding weight


def residual_init_std(n_layer: int) -> float:
    """GPT-2's std for the projections that write into the residual stream (attn.c_proj, mlp.c_proj):
    each block adds two such terms, so scaling by 1/sqrt(2 * n_layer) keeps the stream's variance
    independent of depth at init."""
    return INIT_STD / math.sqrt(2 * n_layer)


def lowrank_factor_std(target_var: float, rank: int) -> float:
    """Std of the entries of a and b so that (b @ a)_ij has variance `target_var`.

    (b @ a)_ij = sum_{r < rank} b_ir a_rj with all entries iid, zero mean, stds s_a, s_b, so
        Var = rank * s_a^2 * s_b^2.
    We choose s_a = s_b = (target_var / rank)^(1/4). The symmetric choice is the balanced point of the
    rescaling symmetry (a -> c a, b -> b / c leaves W unchanged): among all factor pairs giving this
    product it has the least ||a||^2 + ||b||^2, which is where weight decay would drive the pair anyway,
    and it gives both factors comparable gradient scales (grad a involves b, grad b involves a).
    """
    return (target_var / rank) ** 0.25


class LowRankLinear(nn.Module):
    """y = x W^T + bias with W = b @ a, computed as (x a^T) b^T: O(rank * (in + out)) per token."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 init_std: float = INIT_STD, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.init_std = init_std
        self.a = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.b = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = lowrank_factor_std(self.init_std ** 2, self.rank)
        nn.init.normal_(self.a, mean=0.0, std=std)
        nn.init.normal_(self.b, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense out x in weight this layer represents (materialised; inspection/realize only)."""
        return self.b @ self.a

    @torch.no_grad()
    def zero_output_(self) -> None:
        # b = 0 makes W = 0 exactly. Gradients still flow: dL/db = G^T (x a^T) is nonzero because a is
        # nonzero; dL/da = b^T G^T x is zero on the first step only (LoRA's zero-init choice).
        self.b.zero_()
        if self.bias is not None:
            self.bias.zero_()

    def realize(self) -> nn.Linear:
        return _dense_like(self, _product_fp32(self.b, self.a), trainable=self.a.requires_grad)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class ABBALinear(nn.Module):
    """y = x W^T + bias with W = (b1 @ a1) * (b2 @ a2), computed through the Khatri-Rao form.

    Writing the Hadamard product out,
        W_oi = sum_{p,q} b1[o,p] b2[o,q] a1[p,i] a2[q,i] = (B_kr @ A_kr)_oi
    with A_kr[(p,q), :] = a1[p, :] * a2[q, :]   (r1*r2 x in, row-wise Khatri-Rao product)
    and  B_kr[:, (p,q)] = b1[:, p] * b2[:, q]   (out x r1*r2, column-wise Khatri-Rao product).
    So W x = B_kr (A_kr x): two thin matmuls, whose forward and backward only build tensors of the
    factors' sizes (r1*r2 x in, out x r1*r2), never out x in. Forming A_kr and B_kr costs
    r1*r2*(in + out) multiplies, independent of the number of tokens; `_KhatriRaoLinear` pays it
    again in backward so that the factors need not stay alive between the two passes.
    """

    def __init__(self, in_features: int, out_features: int, r1: int, r2: int, bias: bool = True,
                 init_std: float = INIT_STD, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r1, self.r2 = in_features, out_features, r1, r2
        self.init_std = init_std
        self.a1 = nn.Parameter(torch.empty(r1, in_features, **factory))
        self.b1 = nn.Parameter(torch.empty(out_features, r1, **factory))
        self.a2 = nn.Parameter(torch.empty(r2, in_features, **factory))
        self.b2 = nn.Parameter(torch.empty(out_features, r2, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # P = b1 @ a1 and Q = b2 @ a2 are independent and zero-mean, so
        #   Var(P_ij * Q_ij) = E[P^2] E[Q^2] = Var(P) Var(Q) = (r1 s_a1^2 s_b1^2)(r2 s_a2^2 s_b2^2).
        # Giving each term variance init_std (not init_std^2) makes the product's variance init_std^2;
        # splitting it evenly keeps either term from dominating the other, and within a term the
        # factor stds follow lowrank_factor_std (balanced a/b, see there).
        for a, b, rank in ((self.a1, self.b1, self.r1), (self.a2, self.b2, self.r2)):
            std = lowrank_factor_std(self.init_std, rank)
            nn.init.normal_(a, mean=0.0, std=std)
            nn.init.normal_(b, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def khatri_rao_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_kr, B_kr) with B_kr @ A_kr == (b1 @ a1) * (b2 @ a2); index (p, q) -> p * r2 + q."""
        return _row_khatri_rao(self.a1, self.a2), _column_khatri_rao(self.b1, self.b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast, compute in its dtype exactly where plain F.linear calls would (autocast
        # leaves float64 alone); otherwise use the tensors' own dtypes, which must then agree.
        device_type = x.device.type
        compute_dtype = None
        if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
            compute_dtype = torch.get_autocast_dtype(device_type)
        return _KhatriRaoLinear.apply(x, self.a1, self.a2, self.b1, self.b2, self.bias, compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense out x in weight this layer represents (materialised; inspection/realize only)."""
        return (self.b1 @ self.a1) * (self.b2 @ self.a2)

    @torch.no_grad()
    def zero_output_(self) -> None:
        # b1 = 0 makes b1 @ a1 = 0 and so W = 0 exactly. dL/db1 = ((G^T x) * (b2 a2)) a1^T is nonzero;
        # the other factors get zero gradient on the first step only, as in LoRA's zero-init.
        self.b1.zero_()
        if self.bias is not None:
            self.bias.zero_()

    def realize(self) -> nn.Linear:
        weight = _product_fp32(self.b1, self.a1) * _product_fp32(self.b2, self.a2)
        return _dense_like(self, weight, trainable=self.a1.requires_grad)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r1={self.r1}, r2={self.r2}, bias={self.bias is not None}")


FACTORISED = (LowRankLinear, ABBALinear)


def _row_khatri_rao(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """A_kr (r1*r2 x in) with A_kr[p * r2 + q, :] = a1[p, :] * a2[q, :]."""
    return (a1.unsqueeze(1) * a2.unsqueeze(0)).reshape(a1.shape[0] * a2.shape[0], -1)


def _column_khatri_rao(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """B_kr (out x r1*r2) with B_kr[:, p * r2 + q] = b1[:, p] * b2[:, q]."""
    return (b1.unsqueeze(2) * b2.unsqueeze(1)).reshape(b1.shape[0], -1)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


class _KhatriRaoLinear(torch.autograd.Function):
    """y = (x A_kr^T) B_kr^T + bias, saving for backward only x, h = x A_kr^T and the four factors.

    Plain autograd through the Khatri-Rao form keeps A_kr and B_kr alive from forward to backward and
    then builds their gradients beside them: four r1*r2 x d tensors at once, one d x d matrix at
    r1*r2 = d/4, which is the memory the factorisation is meant to save. Here each Khatri-Rao factor
    (and its gradient) exists only while it is used and is rebuilt in backward, costing
    r1*r2*(in + out) multiplies -- small next to the token-sized matmuls.

    Gradients, with G = dL/dy and H = dL/dh = G B_kr (both flattened to tokens x features):
        dL/dB_kr = G^T h,   dL/db1[o,p] = sum_q dL/dB_kr[o,(p,q)] b2[o,q],  likewise b2 summing p
        dL/dA_kr = H^T x,   dL/da1[p,i] = sum_q dL/dA_kr[(p,q),i] a2[q,i],  likewise a2 summing p
        dL/dx = H A_kr,     dL/dbias = sum over tokens of G
    `compute_dtype` is autocast's dtype (or None): the matmuls run in it, the Khatri-Rao products and
    the factor-gradient contractions in the factors' own dtype, as autocast does for the plain form.
    """

    @staticmethod
    def forward(ctx, x, a1, a2, b1, b2, bias, compute_dtype):
        ctx.device_type, ctx.compute_dtype = x.device.type, compute_dtype
        # Autocast is switched off and the casts made by hand, so that backward (which may or may not
        # run under autocast, depending on where .backward() is called) can repeat exactly them.
        with torch.autocast(ctx.device_type, enabled=False):
            x = _cast(x, compute_dtype)
            h = F.linear(x, _cast(_row_khatri_rao(a1, a2), compute_dtype))
            y = F.linear(h, _cast(_column_khatri_rao(b1, b2), compute_dtype), _cast(bias, compute_dtype))
        need_a1, need_a2, need_b1, need_b2 = ctx.needs_input_grad[1:5]
        # x only feeds the a-gradients and h only the b-gradients; drop whichever is not needed.
        ctx.save_for_backward(x if need_a1 or need_a2 else None, h if need_b1 or need_b2 else None,
                              a1, a2, b1, b2)
        return y

    @staticmethod
    @once_differentiable  # h is saved without its graph, so a second derivative would be wrong
    def backward(ctx, grad_y):
        x, h, a1, a2, b1, b2 = ctx.saved_tensors
        need_x, need_a1, need_a2, need_b1, need_b2, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_a1 = grad_a2 = grad_b1 = grad_b2 = grad_bias = None
        out_features, in_features, r1, r2 = b1.shape[0], a1.shape[1], a1.shape[0], a2.shape[0]
        with torch.autocast(ctx.device_type, enabled=False):
            grad_y2 = grad_y.reshape(-1, out_features)
            if need_bias:
                grad_bias = grad_y2.sum(0)
            if need_b1 or need_b2:
                grad_b_kr = (grad_y2.T @ h.reshape(-1, r1 * r2)).to(b1.dtype).view(out_features, r1, r2)
                if need_b1:
                    grad_b1 = (grad_b_kr * b2.unsqueeze(1)).sum(2)
                if need_b2:
                    grad_b2 = (grad_b_kr * b1.unsqueeze(2)).sum(1)
                del grad_b_kr
            if need_x or need_a1 or need_a2:
                grad_h2 = grad_y2 @ _cast(_column_khatri_rao(b1, b2), ctx.compute_dtype)
                if need_x:
                    grad_x = grad_h2 @ _cast(_row_khatri_rao(a1, a2), ctx.compute_dtype)
                    grad_x = grad_x.view(*grad_y.shape[:-1], in_features)
                if need_a1 or need_a2:
                    grad_a_kr = (grad_h2.T @ x.reshape(-1, in_features)).to(a1.dtype).view(r1, r2, -1)
                    if need_a1:
                        grad_a1 = (grad_a_kr * a2.unsqueeze(0)).sum(1)
                    if need_a2:
                        grad_a2 = (grad_a_kr * a1.unsqueeze(1)).sum(0)
        # Gradients left in compute_dtype (x's, the bias's) are cast to their input's dtype by autograd.
        return grad_x, grad_a1, grad_a2, grad_b1, grad_b2, grad_bias, None


def _product_fp32(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # Materialise in fp32 so realizing a bf16 model does not add rounding beyond the final cast.
    return b.detach().float() @ a.detach().float()


@torch.no_grad()
def _dense_like(layer: nn.Module, weight: torch.Tensor, trainable: bool) -> nn.Linear:
    """The nn.Linear with this weight and `layer`'s bias, on `layer`'s device and dtype.

    Realizing changes how a layer is stored, not whether it trains: the dense weight keeps the
    factors' requires_grad (and the bias its own), so a frozen layer stays frozen."""
    reference = next(layer.parameters())
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=reference.device, dtype=reference.dtype)
    dense.weight.copy_(weight)
    dense.weight.requires_grad_(trainable)
    if layer.bias is not None:
        dense.bias.copy_(layer.bias)
        dense.bias.requires_grad_(layer.bias.requires_grad)
    return dense
