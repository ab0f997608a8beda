"""Figure 8: achieved FLOP/s of the dense training step as a share of the measured matmul peak.

Peak: the best of square fp32 matmuls (sizes below) on this device with the suite's thread count,
i.e. what the BLAS actually delivers here, not a datasheet number. Achieved: model/accounting.py's
training FLOPs per token x tokens per step / median step time (matmul FLOPs only, so the share is
the step's model-FLOPs utilisation, MFU).
"""
from __future__ import annotations

import torch

from bench.measure import matmul_peak_flops, time_interleaved
from bench.setups import Context, build_gpt, dense_setups, make_batch, train_step


def run(ctx: Context) -> dict:
    sizes = [256] if ctx.smoke else [512, 1024, 2048]
    peaks = {size: matmul_peak_flops(ctx.device, torch.float32, size, ctx.budget) for size in sizes}
    peak = max(peaks.values())
    rows, data = [], []
    for setup in dense_setups(ctx):
        model = build_gpt(setup.config, ctx.device)
        timing = time_interleaved({"step": train_step(model, make_batch(setup, ctx.device))},
                                  ctx.budget, ctx.device)["step"]
        flops = model.training_flops_per_token(setup.seq_len).training * setup.tokens_per_step
        achieved = flops / timing["median_s"]
        rows.append([setup.name, f"{achieved / 1e9:.1f}", f"{peak / 1e9:.1f}", f"{achieved / peak:.0%}"])
        data.append({"setup": setup.name, "achieved_flops": achieved, "share": achieved / peak,
                     "timing": timing})
    return {
        "figure": 8, "title": "Utilisation: dense step FLOP/s vs measured matmul peak",
        "target": "report the share (no fixed target)",
        "status": "info",
        "summary": (f"matmul peak {peak / 1e9:.1f} GFLOP/s fp32; dense step "
                    + ", ".join(f"{d['setup']} {d['share']:.0%}" for d in data)),
        "tables": [{"columns": ["setup", "achieved GFLOP/s", "matmul peak GFLOP/s", "share"],
                    "rows": rows},
                   {"title": "matmul peak by size (fp32)", "columns": ["n (n x n @ n x n)", "GFLOP/s"],
                    "rows": [[s, f"{f / 1e9:.1f}"] for s, f in peaks.items()]}],
        "notes": ["Small models spend much of the step outside matmuls (LayerNorm, GELU, softmax, "
                  "cross-entropy, AdamW) and run thin matmuls, so a low share is expected at tiny."],
        "profiles": [],
        "data": {"matmul_peak_flops": peaks, "rows": data},
    }
