"""Figure 4: training-step time against the number of frozen leading blocks.

An 8-block model (d=256, 4 heads, T=256, byte vocabulary) with frozen embeddings (so wte / lm_head
and wpe do not train) and blocks 0..n-1 frozen, n = 0..7: the frozen prefix runs under no_grad and
the optimizer covers the trainable blocks only. Every n is a separate model with the same weights,
all timed interleaved. The accounting column is model/accounting.py's training FLOPs relative to
n = 0, i.e. what the step should cost if time followed matmul FLOPs.
"""
from __future__ import annotations

from bench.measure import time_interleaved, top_ops
from bench.setups import VOCAB, Context, ModelSetup, build_gpt, make_batch, train_step
from model import GPTConfig

N_BLOCKS = 8
TARGET = 0.45  # step with 7 of 8 frozen / step with none frozen


def run(ctx: Context) -> dict:
    d, t = (64, 64) if ctx.smoke else (256, 256)
    config = GPTConfig(n_layer=N_BLOCKS, n_head=4, n_embd=d, block_size=t, vocab_size=VOCAB)
    setup = ModelSetup("frozen", config, 2 if ctx.smoke else 8)
    batch = make_batch(setup, ctx.device)
    counts = [0, 7] if ctx.smoke else [0, 2, 4, 6, 7] if ctx.quick else list(range(N_BLOCKS))
    models, steps = {}, {}
    for n in counts:
        model = build_gpt(config, ctx.device)  # same seed: same weights for every n
        model.freeze_embeddings()
        for i in range(n):
            model.freeze_layer(i)
        models[n] = model
        steps[f"{n} frozen"] = train_step(model, batch)
    everything = build_gpt(config, ctx.device)
    steps["all trainable (embeddings too)"] = train_step(everything, batch)
    timing = time_interleaved(steps, ctx.budget, ctx.device)
    base_s = timing["0 frozen"]["median_s"]
    base_flops = models[0].training_flops_per_token().training
    rows, data = [], []
    for n in counts:
        seconds = timing[f"{n} frozen"]["median_s"]
        flops = models[n].training_flops_per_token().training
        rows.append([n, f"{seconds * 1e3:.1f}", f"{seconds / base_s:.1%}", f"{flops / base_flops:.1%}",
                     f"{models[n].param_counts()['trainable']:,}"])
        data.append({"frozen": n, "seconds": seconds, "time_ratio": seconds / base_s,
                     "flops_ratio": flops / base_flops, "timing": timing[f"{n} frozen"]})
    all_s = timing["all trainable (embeddings too)"]["median_s"]
    rows.append(["none, embeddings trainable", f"{all_s * 1e3:.1f}", f"{all_s / base_s:.1%}",
                 f"{everything.training_flops_per_token().training / base_flops:.1%}",
                 f"{everything.param_counts()['trainable']:,}"])
    ratio = timing[f"{counts[-1]} frozen"]["median_s"] / base_s
    met = ratio <= TARGET
    profiles = []
    if not met:
        profiles.append({"title": f"{counts[-1]} frozen: step, top ops",
                         "ops": top_ops(train_step(models[counts[-1]], batch), ctx.device)})
    predicted = data[-1]["flops_ratio"]
    return {
        "figure": 4, "title": "Frozen prefix: step time vs frozen blocks (8 blocks, embeddings frozen)",
        "target": f"step with 7 of 8 blocks frozen <= {TARGET:.0%} of the step with none frozen",
        "status": "met" if met else "missed",
        "summary": (f"7 of 8 frozen costs {ratio:.1%} of the unfrozen step (accounting predicts "
                    f"{predicted:.1%})"),
        "tables": [{"title": f"d={d}, T={t}, B={setup.batch_size}, step = fwd+bwd+AdamW",
                    "columns": ["frozen blocks", "step ms", "time vs 0 frozen", "FLOPs vs 0 frozen",
                                "trainable params"], "rows": rows}],
        "notes": ["Embeddings are frozen in every row but the last, so lm_head (tied to wte) only "
                  "back-propagates to its input."]
                 + ([] if met else [f"Missed by {(ratio - TARGET) * 100:.1f} points; matmul FLOPs "
                                    f"alone predict {predicted:.1%}."]),
        "profiles": profiles,
        "data": {"d": d, "seq_len": t, "batch_size": setup.batch_size, "rows": data,
                 "all_trainable_seconds": all_s, "ratio_7_of_8": ratio},
    }
