"""approxgpt's performance suite: `python -m bench [--quick | --smoke] [--only NAME ...] [--device cpu|cuda]`.

Runs the figures of issue 6 and writes <out>/REPORT.md and <out>/results.json (out = bench/ by
default). A benchmark that raises is recorded as an error with its message and the rest still run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.measure import machine_info
from bench.report import render
from bench.setups import BUDGETS, Context

# name -> module (each has run(ctx) -> dict), in figure order
BENCHMARKS = {
    "dense_step": "bench.dense_step",
    "linears": "bench.linears",
    "attention": "bench.attention",
    "frozen_prefix": "bench.frozen_prefix",
    "approx_model": "bench.approx_model",
    "deepspeed": "bench.deepspeed_engine",
    "tune": "bench.tune_overhead",
    "utilisation": "bench.utilisation",
}

THREADS_NOTE_CPU = (
    "torch.set_num_threads({n}). One thread is the default on CPU because this 2-core machine is "
    "shared: with two OpenMP threads, every parallel region waits for a thread that another process "
    "has descheduled, which measured 0.7 ms -> 48 ms for a 16-token linear layer under load. One "
    "thread times the kernels rather than the scheduler; pass --threads 2 on a quiet machine.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer sizes and rounds (a few minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds: checks it runs")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these: {', '.join(BENCHMARKS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU, torch's default on cuda)")
    parser.add_argument("--merge", action="store_true",
                        help="update the benchmarks run now inside the existing results.json "
                             "(same mode and device), keeping the others, and re-render the report")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for REPORT.md and results.json (default: bench/)")
    return parser.parse_args(argv)


def merge(path: Path, new: dict) -> dict:
    """`new`'s benchmarks replace those of the same name in the results at `path` (figure order)."""
    old = json.loads(path.read_text())
    for key in ("mode", "threads"):
        if old["run"][key] != new["run"][key]:
            raise SystemExit(f"--merge: {path} was run with {key}={old['run'][key]}, this run has "
                             f"{key}={new['run'][key]}; rerun everything instead")
    if old["machine"]["device"] != new["machine"]["device"]:
        raise SystemExit(f"--merge: {path} was measured on {old['machine']['device']}")
    by_name = {b["name"]: b for b in old["benchmarks"]}
    by_name.update({b["name"]: b for b in new["benchmarks"]})
    old["benchmarks"] = sorted(by_name.values(), key=lambda b: list(BENCHMARKS).index(b["name"]))
    old["run"]["wall_s"] += new["run"]["wall_s"]
    old["run"]["command"] += f"; then {new['run']['command']}"
    old["run"]["finished"] = new["run"]["finished"]
    return old


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    ctx = Context(device=device, mode=mode, budget=BUDGETS[mode])
    names = args.only or list(BENCHMARKS)
    machine = machine_info(device)
    started = time.perf_counter()
    benchmarks = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(BENCHMARKS[name]).run(ctx)
        except Exception as error:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            result = {"figure": list(BENCHMARKS).index(name) + 1, "title": name,
                      "target": "-", "status": "error",
                      "summary": f"{type(error).__name__}: {error}", "tables": [], "notes": [],
                      "profiles": [], "data": {}}
        result["name"] = name
        result["wall_s"] = time.perf_counter() - t0
        print(f"[bench] {name}: {result['status']} ({result['wall_s']:.0f} s) {result['summary']}",
              file=sys.stderr, flush=True)
        benchmarks.append(result)
    try:
        machine["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    command = "python -m bench" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    results = {
        "machine": machine,
        "run": {"command": command, "mode": mode, "threads": threads,
                "threads_note": (THREADS_NOTE_CPU.format(n=threads) if device.type == "cpu"
                                 else f"torch.set_num_threads({threads}) (host side only)"),
                "wall_s": time.perf_counter() - started,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "benchmarks": benchmarks,
    }
    if args.merge:
        results = merge(args.out / "results.json", results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "REPORT.md").write_text(render(results))
    print(f"[bench] wrote {args.out / 'REPORT.md'} and {args.out / 'results.json'}", file=sys.stderr)
    return 1 if any(b["status"] == "error" for b in benchmarks) else 0


if __name__ == "__main__":
    sys.exit(main())
