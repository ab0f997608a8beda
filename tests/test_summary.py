"""python -m distributed.summary: the numbers it prints are the model's own accounting."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from distributed.config import load_config
from distributed.schedule import block_budgets, build_plan, dense_lr_integral
from distributed.summary import main as summary_main
from model import GPT, ApproxConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/experiments/tiny.yaml"


def run_summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distributed.summary", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def numbers_after(label: str, text: str) -> list[int]:
    """Every `label=1,234` in text, as ints, in order."""
    return [int(n.replace(",", "")) for n in re.findall(rf"\b{label}=([\d,]+)", text)]


def test_summary_matches_model_accounting_and_dense_equivalent():
    overrides = ["model.n_layer=3", "approx.layers={1: {mlp_fc: {kind: dense}}}"]
    result = run_summary("--config", TINY, *overrides)
    assert result.returncode == 0, result.stderr
    out = result.stdout

    config = load_config(ROOT / TINY, overrides).model
    model = GPT(config)
    dense = GPT(config.model_copy(update={"approx": ApproxConfig()}))
    counts, dense_counts = model.param_counts(), dense.param_counts()
    flops, dense_flops = model.training_flops_per_token(), dense.training_flops_per_token()

    # First the approximated model, then the dense equivalent.
    assert numbers_after("total", out) == [counts["total"], dense_counts["total"]]
    assert numbers_after("trainable", out) == [counts["trainable"]]
    assert numbers_after("training", out)[-2:] == [flops.training, dense_flops.training]
    assert counts["total"] < dense_counts["total"]
    ratio = f"params {counts['total'] / dense_counts['total']:.3f}x"
    assert ratio in out

    # Per-block sites: the per-layer override shows on block 1 only.
    blocks = {int(m.group(1)): m.group(2) for m in re.finditer(r"^block (\d+): (.*)$", out, re.M)}
    assert sorted(blocks) == [0, 1, 2]
    assert "mlp_fc=lowrank(r=32)" in blocks[0] and "mlp_fc=dense" in blocks[1]
    assert all("attn_qkv=abba(r1=8,r2=8)" in line and "compressed(slots=2,chunk=16,window=8) (core 0.630x full causal)" in line for line in blocks.values())

    # Then the stage plan and the per-block budget table, one row per block.
    assert "full-rank finish" in out and "per-block budget (wsd LR" in out
    rows = re.findall(r"^(\d+)\s+(\d+)\s+([\d.e-]+)\s+([\d.]+)%$", out, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2]


def test_json_prints_the_plan_with_every_blocks_budget(capsys):
    overrides = ["schedule.freeze_previous=false", "train.max_steps=300"]
    assert summary_main(["--config", TINY, "--json", *overrides]) == 0
    record = json.loads(capsys.readouterr().out)
    cfg = load_config(ROOT / TINY, overrides)
    plan = build_plan(cfg)
    assert record["blocks"] == [{"index": b.index, "steps_trained": b.steps_trained,
                                 "lr_integral": b.lr_integral} for b in block_budgets(cfg, plan)]
    assert record["dense_lr_integral"] == dense_lr_integral(cfg)
    assert [s["steps"] for s in record["stages"]] == [s.steps for s in plan]
    assert min(b["lr_integral"] for b in record["blocks"]) >= 0.5 * record["dense_lr_integral"]


def test_bad_override_exits_2_with_the_config_error():
    result = run_summary("--config", TINY, "approx.mlp_fc.rank=999")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "approx.mlp_fc.rank = 999" in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_exits_2():
    result = run_summary("--config", "configs/experiments/no-such.yaml")
    assert result.returncode == 2
    assert "does not exist" in result.stderr
