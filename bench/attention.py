"""Figure 3: the causal Linformer core against causal scaled_dot_product_attention, over T.

Cores only (the qkv and output projections are the same for both and cancel): per-head q, k, v of
shape (B, 4 heads, T, 64) (d = 256) that need gradients, forward + backward against a fixed output
gradient. Linformer: k = 64 slots, chunk 64, window 0 (model/config.py defaults), block_size = the
largest T. The scaling exponent is the least-squares slope of log(time) on log(T); the crossover is
the smallest measured T from which Linformer is faster at every larger T too.
"""
from __future__ import annotations

import math

import torch

from bench.measure import peak_bytes, time_interleaved, top_ops
from bench.setups import Context
from model.attention import CausalLinformerAttention, FullCausalAttention

N_HEAD, HEAD_DIM, K, CHUNK, WINDOW = 4, 64, 64, 64, 0
EXPONENT_TARGET, CROSSOVER_TARGET = 1.2, 1024


def _fwd_bwd(core, q, k, v, grad_out):
    def step():
        core(q, k, v).backward(grad_out)
        for t in (q, k, v):
            t.grad = None
        for p in core.parameters():
            p.grad = None

    return step


def fitted_exponent(seq_lens: list[int], seconds: list[float]) -> float:
    xs = [math.log(t) for t in seq_lens]
    ys = [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def crossover(seq_lens: list[int], linformer: list[float], full: list[float]) -> int | None:
    """Smallest T from which Linformer wins at every measured T >= it (None if it never does)."""
    winner = None
    for t, lin, ful in reversed(list(zip(seq_lens, linformer, full))):
        if lin >= ful:
            break
        winner = t
    return winner


def run(ctx: Context) -> dict:
    seq_lens = ([128, 256] if ctx.smoke else [256, 512, 1024, 2048] if ctx.quick
                else [256, 512, 1024, 2048, 4096])
    batch = 1 if ctx.smoke else 2
    torch.manual_seed(0)
    linformer = CausalLinformerAttention(max(seq_lens), K, WINDOW, CHUNK, dropout=0.0).to(ctx.device)
    full = FullCausalAttention(dropout=0.0)
    rows, series, profiles = [], {"linformer": [], "sdpa": []}, []
    peaks = {"linformer": [], "sdpa": []}
    for t in seq_lens:
        shape = (batch, N_HEAD, t, HEAD_DIM)
        q, k, v = (torch.randn(shape, device=ctx.device, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(shape, device=ctx.device)
        variants = {"linformer": _fwd_bwd(linformer, q, k, v, grad_out),
                    "sdpa": _fwd_bwd(full, q, k, v, grad_out)}
        timing = time_interleaved(variants, ctx.budget, ctx.device)
        for name, fn in variants.items():
            series[name].append(timing[name]["median_s"])
            peaks[name].append(peak_bytes(fn, ctx.device))
        rows.append([t, f"{timing['linformer']['median_s'] * 1e3:.2f}",
                     f"{timing['sdpa']['median_s'] * 1e3:.2f}",
                     f"{timing['sdpa']['median_s'] / timing['linformer']['median_s']:.2f}x",
                     f"{peaks['linformer'][-1] / 2**20:.1f}", f"{peaks['sdpa'][-1] / 2**20:.1f}"])
    exponents = {name: fitted_exponent(seq_lens, s) for name, s in series.items()}
    # The asymptotic exponent is what "linear in T" is about: fit the upper half too, where fixed
    # per-call costs no longer dominate.
    upper = min(len(seq_lens) // 2, len(seq_lens) - 2)
    upper_exponent = fitted_exponent(seq_lens[upper:], series["linformer"][upper:])
    cross = crossover(seq_lens, series["linformer"], series["sdpa"])
    problems = []
    if exponents["linformer"] > EXPONENT_TARGET:
        problems.append(f"Linformer exponent {exponents['linformer']:.2f} > {EXPONENT_TARGET}")
    if cross is None or cross > CROSSOVER_TARGET:
        problems.append(f"crossover {'not reached up to T=' + str(seq_lens[-1]) if cross is None else 'T=' + str(cross)}"
                        f" (target <= {CROSSOVER_TARGET})")
    if problems:
        mid = min(seq_lens, key=lambda t: abs(t - CROSSOVER_TARGET))
        shape = (batch, N_HEAD, mid, HEAD_DIM)
        q, k, v = (torch.randn(shape, device=ctx.device, requires_grad=True) for _ in range(3))
        g = torch.randn(shape, device=ctx.device)
        profiles.append({"title": f"linformer fwd+bwd at T={mid}, top ops",
                         "ops": top_ops(_fwd_bwd(linformer, q, k, v, g), ctx.device)})
        profiles.append({"title": f"sdpa fwd+bwd at T={mid}, top ops",
                         "ops": top_ops(_fwd_bwd(full, q, k, v, g), ctx.device)})
    return {
        "figure": 3, "title": "Causal Linformer core vs causal SDPA over sequence length",
        "target": (f"Linformer time exponent <= {EXPONENT_TARGET} for fixed k; wins from "
                   f"T <= {CROSSOVER_TARGET} (d=256, 4 heads, k=64)"),
        "status": "missed" if problems else "met",
        "summary": (f"exponent linformer {exponents['linformer']:.2f} (upper half "
                    f"{upper_exponent:.2f}), sdpa {exponents['sdpa']:.2f}; crossover "
                    f"{'none up to T=' + str(seq_lens[-1]) if cross is None else 'T=' + str(cross)}"),
        "tables": [{"title": f"fwd+bwd, B={batch}, {N_HEAD} heads x {HEAD_DIM}, k={K}, chunk={CHUNK}, "
                             f"window={WINDOW}",
                    "columns": ["T", "linformer ms", "sdpa ms", "speed-up (sdpa/linformer)",
                                "linformer peak MiB", "sdpa peak MiB"], "rows": rows}],
        "notes": [f"Fitted exponents over T={seq_lens[0]}..{seq_lens[-1]}: linformer "
                  f"{exponents['linformer']:.2f}, sdpa {exponents['sdpa']:.2f}; linformer over the "
                  f"upper half only: {upper_exponent:.2f}.",
                  "Peak = allocator bytes above the level before the call (q, k, v, output gradient "
                  "excluded)."] + ([f"Missed: {'; '.join(problems)}."] if problems else []),
        "profiles": profiles,
        "data": {"seq_lens": seq_lens, "batch": batch, "seconds": series, "peak_bytes": peaks,
                 "exponents": exponents, "linformer_upper_exponent": upper_exponent,
                 "crossover": cross},
    }
