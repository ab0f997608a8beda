"""The performance suite runs end to end and writes its report. Speed figures are not checked here
(timings belong to `python -m bench`, not to the test run); what the multi-process figures count
(rebuilds, optimizer bytes, trials) is."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_PROCESS = ["dense_step", "linears", "attention", "frozen_prefix", "approx_model", "utilisation"]


def test_bench_smoke_writes_report_and_json(tmp_path):
    subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", *IN_PROCESS,
                    "--out", str(tmp_path)], cwd=REPO, check=True, timeout=300,
                   capture_output=True, text=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [b["name"] for b in results["benchmarks"]] == IN_PROCESS
    assert all(b["status"] in ("met", "tie", "missed", "info") for b in results["benchmarks"])
    assert results["machine"]["torch"] and results["run"]["threads"] >= 1
    report = (tmp_path / "REPORT.md").read_text()
    for b in results["benchmarks"]:
        assert f"## Figure {b['figure']}: {b['title']}" in report
    assert "## How to rerun" in report


@pytest.mark.slow
def test_bench_quick_runs_the_multi_process_figures(tmp_path):
    """Figures 6 and 7 launch real processes (a 2-rank DeepSpeed job over gloo; a local Ray cluster
    running two Tune trials), which smoke mode skips: here they run as `--quick` runs them, and what
    they report must be the measurement the figure claims."""
    subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "deepspeed", "tune",
                    "--out", str(tmp_path)], cwd=REPO, check=True, timeout=600,
                   capture_output=True, text=True)
    results = {b["figure"]: b for b in json.loads((tmp_path / "results.json").read_text())["benchmarks"]}
    assert results[6]["status"] == results[7]["status"] == "info"

    rows = {(r["zero_stage"], r["freeze"]): r for r in results[6]["data"]["rows"]}
    assert set(rows) == {(zero, freeze) for zero in (0, 1, 2, 3) for freeze in (False, True)}
    for (zero, freeze), row in rows.items():
        assert len(row["rebuild_s"]) == 3 and all(s > 0 for s in row["rebuild_s"])  # 3 boundaries
        assert len(row["opt_bytes_per_rank"]) == 2
        if freeze:  # freezing drops the optimizer state of the frozen blocks on every rank
            assert all(f < u for f, u in zip(row["opt_bytes_per_rank"], rows[(zero, False)]["opt_bytes_per_rank"]))
    # ZeRO-1..3 partition the state across the 2 ranks: less per rank than ZeRO-0 holds.
    assert rows[(3, False)]["opt_bytes_per_rank"][0] < rows[(0, False)]["opt_bytes_per_rank"][0]

    trials = results[7]["data"]["trials"]
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)
    assert all(0 < t["trial_start_to_first_step_s"] < t["trial_wall_s"] for t in trials)
    assert results[7]["data"]["trials_per_hour"] > 0
