"""Figure 1: approxgpt's dense GPT against the nanoGPT-style reference, one training step.

Both models get identical weights (the reference loads the dense GPT's state dict; keys are
nanoGPT's), the same batch and the same AdamW. Ratio = reference time / approxgpt time, so >= 1.0
means approxgpt is at least as fast. The bf16 row is approxgpt's step under
torch.autocast(bfloat16) against its fp32 step.
"""
from __future__ import annotations

import torch

from bench.measure import time_interleaved, top_ops
from bench.reference import ReferenceGPT
from bench.setups import Context, build_gpt, dense_setups, make_batch, train_step

TARGET = 1.0


def run(ctx: Context) -> dict:
    rows, data, profiles, missed = [], [], [], []
    ties = 0  # misses smaller than the round-to-round spread
    for setup in dense_setups(ctx):
        c = setup.config
        ours = build_gpt(c, ctx.device)
        reference = ReferenceGPT(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.bias)
        reference.load_state_dict(ours.state_dict())
        reference.to(ctx.device)
        batch = make_batch(setup, ctx.device)
        variants = {"approxgpt": train_step(ours, batch), "reference": train_step(reference, batch)}
        timing = time_interleaved(variants, ctx.budget, ctx.device)
        ratio = timing["reference"]["median_s"] / timing["approxgpt"]["median_s"]
        # bf16 separately (autocast changes both models alike; the question is what it buys ours).
        bf16_dtype = torch.bfloat16
        amp = time_interleaved({"fp32": train_step(ours, batch),
                                "bf16": train_step(ours, batch, autocast_dtype=bf16_dtype)},
                               ctx.budget, ctx.device)
        bf16_speedup = amp["fp32"]["median_s"] / amp["bf16"]["median_s"]
        tokens = setup.tokens_per_step
        rows.append([setup.name, f"{c.n_layer}L d={c.n_embd} T={c.block_size} B={setup.batch_size}",
                     f"{timing['approxgpt']['median_s'] * 1e3:.1f}",
                     f"{timing['reference']['median_s'] * 1e3:.1f}", f"{ratio:.3f}",
                     f"{tokens / timing['approxgpt']['median_s']:,.0f}", f"{bf16_speedup:.2f}x",
                     f"{max(timing['approxgpt']['spread'], timing['reference']['spread']):.0%}"])
        data.append({"setup": setup.name, "config": c.model_dump(exclude={"approx"}),
                     "batch_size": setup.batch_size, "timing": timing, "ratio": ratio,
                     "bf16_timing": amp, "bf16_speedup": bf16_speedup})
        if ratio < TARGET:
            spread = max(timing["approxgpt"]["spread"], timing["reference"]["spread"])
            tie = " -- within the rounds' spread, a tie" if TARGET - ratio < spread else ""
            ties += bool(tie)
            missed.append(f"{setup.name}: {ratio:.3f} ({(TARGET - ratio) * 100:.1f}% short{tie})")
            profiles.append({"title": f"{setup.name}: approxgpt step, top ops by self time",
                             "ops": top_ops(train_step(ours, batch), ctx.device)})
            profiles.append({"title": f"{setup.name}: reference step, top ops by self time",
                             "ops": top_ops(train_step(reference, batch), ctx.device)})
    return {
        "figure": 1, "title": "Dense training step vs nanoGPT-style reference",
        "target": f"reference time / approxgpt time >= {TARGET} at tiny and medium",
        "status": ("met" if not missed else "tie" if ties == len(missed) else "missed"),
        "summary": ("ratios " + ", ".join(f"{d['setup']} {d['ratio']:.3f}" for d in data)
                    + "; bf16 autocast speed-up " + ", ".join(f"{d['setup']} {d['bf16_speedup']:.2f}x"
                                                            for d in data)),
        "tables": [{"columns": ["setup", "shape", "approxgpt ms", "reference ms", "ratio (ref/ours)",
                                "approxgpt tokens/s", "bf16 autocast speed-up", "max spread"],
                    "rows": rows}],
        "notes": ["Step = forward + backward + AdamW (foreach) + zero_grad, fp32 unless stated, "
                  "dropout 0. Ratios within the spread of the rounds are ties."]
                 + ([f"Missed: {'; '.join(missed)}. See the profiles."] if missed else []),
        "profiles": profiles,
        "data": data,
    }
