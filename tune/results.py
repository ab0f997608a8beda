"""The experiment directory and the results table built from it.

    EXPERIMENT_DIR/
      experiment.json          the ablation config, the variants, the validation-token statistics
      trials/<variant>_s<seed>/
        trial.json             written by the Tune trial: variant, seed, axes, status, attempts, times
        metrics.jsonl, ...     written by the trainer (distributed.train): one JSON record per log line
      tune/                    Ray Tune's own state (what `Tuner.restore` reads)
      results.csv              one row per trial (this module)
      report.md, *.png         tune/report.py

Everything here reads files only, so `python -m tune.report EXPERIMENT_DIR` can rebuild the table
and the report on any machine that has the directory.
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path

from distributed import metrics as trainer_metrics

TRIALS = "trials"
EXPERIMENT_JSON = "experiment.json"
TRIAL_JSON = "trial.json"
METRICS = trainer_metrics.METRICS_FILE
RESULTS_CSV = "results.csv"

# Statuses a trial.json can hold.
RUNNING, OK, ERROR = "running", "ok", "error"

# The three points at which a trial's loss is read (each answers its own question; see tune/report.py)
# and the training FLOPs spent by then.
METRIC_POINTS = {"before_finish": ("val_loss_before_finish", "flops_before_finish"),
                 "realized": ("val_loss_after_realize", "flops_before_finish"),
                 "final": ("final_val_loss", "training_flops")}
NUMERIC = ("final_val_loss", "val_loss_before_finish", "val_loss_after_realize", "training_flops",
           "flops_before_finish", "tokens", "wall_time_s", "tokens_per_s", "total_params",
           "peak_trainable_params", "peak_memory_bytes", "min_block_lr_ratio")
COLUMNS = ("variant", "seed", "status", "baseline", "budget", "axes", *NUMERIC, "attempts", "run_dir",
           "error")


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# What the report needs from experiment.json (tune.grid.experiment_record writes it).
EXPERIMENT_KEYS = ("name", "experiment", "seeds", "axes", "free_axes", "fixed_axes", "variants", "trials")
TRIAL_KEYS = ("trial_name", "variant", "seed")


def read_experiment(experiment_dir: str | Path) -> dict:
    """experiment.json, checked: FileNotFoundError / ValueError naming the file and what is wrong."""
    path = Path(experiment_dir) / EXPERIMENT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{experiment_dir} has no {EXPERIMENT_JSON}; is it an ablation's "
                                "experiment directory (its out_dir)?")
    rewrite = "`python -m tune.ablation` with the same config rewrites it"
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); {rewrite}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(spec).__name__}; {rewrite}")
    missing = [key for key in EXPERIMENT_KEYS if key not in spec]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (a partial file?); {rewrite}")
    for i, trial in enumerate(spec["trials"] if isinstance(spec["trials"], list) else [None]):
        if not isinstance(trial, dict) or any(key not in trial for key in TRIAL_KEYS):
            raise ValueError(f"{path}: trials[{i}] = {trial!r} needs {', '.join(TRIAL_KEYS)}; {rewrite}")
    return spec


def trial_dir(experiment_dir: str | Path, trial_name: str) -> Path:
    return Path(experiment_dir).resolve() / TRIALS / trial_name


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The trainer's metrics records, read by the trainer's own reader (latest attempt wins for each
    (event, step, when); a torn last line is skipped); [] for a trial that never started."""
    if not (Path(run_dir) / METRICS).is_file():
        return []
    return trainer_metrics.read_metrics(run_dir)


def evaluations(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("event") == "eval" and r.get("val_loss") is not None]


def _last(records: list[dict], key: str) -> float | None:
    for record in reversed(records):
        if record.get(key) is not None:
            return float(record[key])
    return None


def _max(records: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in records if r.get(key) is not None]
    return max(values) if values else None


def min_block_lr_ratio(records: list[dict]) -> float | None:
    """The least-trained block's LR integral over one block's in the dense baseline, from the newest
    `run_start` record that carries the per-block budget (None when the trainer did not log it)."""
    for record in reversed(records):
        if record.get("event") == "run_start" and record.get("blocks") and record.get("dense_lr_integral"):
            return min(float(b["lr_integral"]) for b in record["blocks"]) / float(record["dense_lr_integral"])
    return None


def summarize_metrics(records: list[dict]) -> dict:
    """One trial's headline numbers from its metrics records."""
    evals = evaluations(records)
    # The full-rank finish logs an eval with when="realized" right after realizing the model; the
    # eval just before it is the approximated model's last word. Without a finish: the final one.
    realized = next((i for i, r in enumerate(evals) if r.get("when") == "realized"), None)
    before = evals[realized - 1] if realized else (evals[-1] if evals and realized is None else None)
    train = [r for r in records if r.get("event") == "train"]
    speeds = [float(r["tokens_per_s"]) for r in train if r.get("tokens_per_s")]
    # Parameter counts describe the approximated model: after the finish every variant is the same
    # dense model, so counts from then on would say nothing about the variant.
    cutoff = evals[realized]["time"] if realized is not None else math.inf
    approximated = [r for r in train if r.get("time", 0.0) < cutoff] or train
    return {
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "val_loss_before_finish": before["val_loss"] if before else None,
        "val_loss_after_realize": evals[realized]["val_loss"] if realized is not None else None,
        "training_flops": _max(records, "flops"),
        "flops_before_finish": before.get("flops") if before else None,
        "min_block_lr_ratio": min_block_lr_ratio(records),
        "tokens": _max(records, "tokens"),
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "total_params": _last(approximated, "params_total"),
        "peak_trainable_params": _max(approximated, "params_trainable"),
        "peak_memory_bytes": _max(records, "peak_memory_bytes"),
    }


def collect(experiment_dir: str | Path) -> list[dict]:
    """One row per trial directory, in the order of experiment.json's trial list."""
    experiment_dir = Path(experiment_dir)
    spec = read_json(experiment_dir / EXPERIMENT_JSON)
    rows = []
    for trial in spec["trials"]:
        run_dir = experiment_dir / TRIALS / trial["trial_name"]
        info = read_json(run_dir / TRIAL_JSON) if (run_dir / TRIAL_JSON).is_file() else {}
        row = {
            "variant": trial["variant"], "seed": trial["seed"], "baseline": trial["baseline"],
            "budget": trial.get("budget", 1.0), "axes": trial["axes"],
            "status": info.get("status", "not started"),
            "wall_time_s": info.get("wall_time_s"),
            "attempts": info.get("attempts", 0),
            "run_dir": str(Path(TRIALS) / trial["trial_name"]),
            "error": info.get("error") or "",
        }
        row.update(summarize_metrics(read_metrics(run_dir)))
        if row["status"] == OK and row["final_val_loss"] is None:
            row["status"], row["error"] = ERROR, "finished without any validation loss logged"
        if not any(trial["axes"].values()) and row["val_loss_after_realize"] is None:
            # A dense model (baseline, frontier point) has nothing to realize: all three metric
            # points are its final loss. An approximated variant without a finish has no measured
            # realized loss (realizing compressed attention is not exact), so it stays empty.
            row["val_loss_after_realize"] = row["final_val_loss"]
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def write_csv(rows: list[dict], path: str | Path, axes: list[str]) -> None:
    """results.csv: the axes become one 0/1 column each (`axis.<name>`)."""
    header = [c for c in COLUMNS if c != "axes"]
    header[header.index("baseline") + 1:header.index("baseline") + 1] = [f"axis.{a}" for a in axes]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            flat = {**row, **{f"axis.{a}": row["axes"][a] for a in axes}}
            writer.writerow([_cell(flat.get(c)) for c in header])
    os.replace(tmp, path)


def read_csv(path: str | Path) -> list[dict]:
    """Rows as `collect` returns them (numbers parsed, axes folded back into a dict)."""
    rows = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row = {"variant": raw["variant"], "seed": int(raw["seed"]), "status": raw["status"],
                   "baseline": raw["baseline"] == "1", "budget": float(raw.get("budget") or 1.0),
                   "run_dir": raw["run_dir"],
                   "error": raw["error"], "attempts": int(raw["attempts"] or 0),
                   "axes": {k.removeprefix("axis."): v == "1" for k, v in raw.items()
                            if k.startswith("axis.")}}
            row.update({k: float(raw[k]) if raw.get(k) else None for k in NUMERIC})
            rows.append(row)
    return rows
