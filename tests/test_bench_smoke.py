"""The performance suite runs end to end and writes its report (figures are not checked here:
timings belong to `python -m bench`, not to the test run)."""
import json
import subprocess
import sys
from pathlib import Path

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
