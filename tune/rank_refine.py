"""The optional joint refinement of the rank search (`refine.enabled: true`): Optuna through Ray Tune,
started from an allocation, in a space clipped below every site's FLOPs break-even.

The sweep measures each site alone and the allocation assumes their losses add up; the refinement
asks what the sites do together, near that allocation. Each site the allocation approximates is
searched within [r / span, r * span] (never at or above its break-even); sites it left dense stay
dense. The allocation itself is the first point. The sampler is explicit:

* `tpe`: Optuna's TPESampler on val loss; its first `n_startup_trials` points are random (kept well
  below num_samples, so most of the search is model-guided). The allocation's FLOPs budget is a
  constraint: a point over it is not trained and scores the uniform-guess loss ln(vocab_size).
* `nsga2`: Optuna's NSGAIISampler on (val loss, training FLOPs): a Pareto front, no budget.

The choice is the knee rule "cheapest within noise of the best": among finished trials, the one with
the fewest training FLOPs whose loss is within the allocation's 95% CI half-width (its seed noise) of
the best loss. Single-seed search results are optimistic for the winner (winner's curse), so the
chosen point is trained again with `refine.seeds` and reported with its CI (refined.json,
refined.yaml).
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from tune.allocation import mean_ci
from tune.driver import TrialSpec, fit_or_resume, run_grid, start_ray
from tune.results import OK, TRIALS, write_json_atomic

REFINE_TUNE, REFINE_RERUN_TUNE = "tune_refine", "tune_refine_rerun"


def refine_space(ranks: dict[str, int | None], break_even: dict[str, int], span: float) -> dict:
    """site -> (low, high) for every site the allocation approximates, clipped below break-even."""
    out = {}
    for site, r in ranks.items():
        if r is None:
            continue
        high = min(break_even[site] - 1, max(r, int(math.floor(r * span))))
        low = max(1, min(r, int(math.ceil(r / span))))
        out[site] = (low, high)
    return out


def knee(trials: list[dict], noise: float) -> dict | None:
    """The cheapest finished trial whose loss is within `noise` of the best loss."""
    done = [t for t in trials if t.get("loss") is not None and math.isfinite(t["loss"])
            and t.get("training_flops")]
    if not done:
        return None
    best = min(t["loss"] for t in done)
    return min((t for t in done if t["loss"] <= best + noise), key=lambda t: t["training_flops"])


def _refine_trial(config: dict, search: dict) -> None:
    """Tune function trainable: the sampled ranks -> one training run (or, over budget, none)."""
    import ray.tune

    from tune import rank_search as rs
    from tune.trainable import run_trial

    rsc = rs.RankSearchConfig.model_validate(search["config"])
    ranks = {site: int(config[site]) for site in search["space"]}
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"refine_{trial_id}"
    run_dir = Path(search["experiment_dir"]) / TRIALS / name
    approx = {s: rs.KNOBS[rsc.sites[s].kind].spec(r, rsc.sites[s].fixed) for s, r in ranks.items()}
    cfg = rs.experiment_for(search["base"], seed=rsc.allocation.seeds[0], name=name, run_dir=run_dir,
                            approx=approx)
    write_json_atomic(run_dir / "ranks.json", ranks)
    flops = rs.estimated_training_flops(cfg, rsc.resources.workers_per_trial)
    if search["budget_flops"] is not None and flops > search["budget_flops"]:
        write_json_atomic(run_dir / "trial.json", {"trial_name": name, "status": "over budget"})
        ray.tune.report({"val_loss": math.log(cfg.model.vocab_size), "training_flops": flops,
                         "over_budget": True, "done": True})
        return
    run_trial(TrialSpec(trial_name=name, experiment=cfg.model_dump(mode="json"), run_dir=str(run_dir),
                        ray_storage=str(Path(search["experiment_dir"]) / "ray_train"),
                        resources=rsc.resources.model_dump(),
                        worker_restarts=rsc.failures.worker_restarts,
                        record={"role": "refine", "ranks": ranks}))


def run_refinement(config, experiment_dir: Path, result: dict, *, address: str | None = None,
                   worker_logs: bool = False) -> dict | None:
    """Search around the allocation (refine.budget, default best.yaml's), re-run the knee with
    refine.seeds; write refined.json and refined.yaml. Returns refined.json's content."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from tune import rank_search as rs
    from tune.results import read_json, read_metrics, summarize_metrics

    ref = config.refine
    search_record = read_json(experiment_dir / rs.SEARCH_JSON)
    key = f"{ref.budget:g}" if ref.budget is not None else result["best"]
    allocation = search_record["allocations"].get(key)
    summary = result["summary"].get(key, {})
    if not allocation or not allocation.get("feasible"):
        raise rs.ConfigError(f"refine.budget = {key}: no feasible allocation to start from")
    space = refine_space(allocation["ranks"], search_record["break_even"], ref.span)
    if not space:
        print("refinement skipped: the allocation approximates no site", flush=True)
        return None
    lo, hi = summary.get("ci", [None, None])
    noise = (hi - lo) / 2 if lo is not None and hi is not None else 0.0
    base = rs.base_experiment(config)
    budget_flops = allocation["budget"] * allocation["dense_flops"] if ref.sampler == "tpe" else None
    search = {"config": config.model_dump(mode="json"), "space": list(space), "base": base,
              "experiment_dir": str(experiment_dir), "budget_flops": budget_flops}
    start_ray(address, worker_logs)
    trainable = tune.with_resources(tune.with_parameters(_refine_trial, search=search),
                                    {"memory": 256 * 2**20})
    first = [{s: allocation["ranks"][s] for s in space}]

    def make(trainable):
        if ref.sampler == "tpe":
            sampler = optuna.samplers.TPESampler(n_startup_trials=ref.n_startup_trials,
                                                 seed=ref.sampler_seed)
            searcher = OptunaSearch(metric="val_loss", mode="min", sampler=sampler,
                                    points_to_evaluate=first)
        else:
            sampler = optuna.samplers.NSGAIISampler(seed=ref.sampler_seed)
            searcher = OptunaSearch(metric=["val_loss", "training_flops"], mode=["min", "min"],
                                    sampler=sampler, points_to_evaluate=first)
        return tune.Tuner(
            trainable,
            param_space={s: tune.lograndint(low, high + 1) if high > low else low
                         for s, (low, high) in space.items()},
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=ref.num_samples,
                                        max_concurrent_trials=config.resources.max_concurrent_trials),
            run_config=tune.RunConfig(name=REFINE_TUNE, storage_path=str(experiment_dir),
                                      failure_config=tune.FailureConfig(
                                          max_failures=config.failures.trial_retries), verbose=1))

    fit_or_resume(experiment_dir, REFINE_TUNE, trainable, make)
    trials = []
    for run_dir in sorted((experiment_dir / TRIALS).glob("refine_*")):
        info = read_json(run_dir / "trial.json") if (run_dir / "trial.json").is_file() else {}
        s = summarize_metrics(read_metrics(run_dir))
        loss = s["final_val_loss"] if config.allocation.metric == "final" else s["val_loss_before_finish"]
        trials.append({"trial": run_dir.name, "status": info.get("status"),
                       "ranks": read_json(run_dir / "ranks.json"),
                       "loss": loss if info.get("status") == OK else None,
                       "training_flops": s["training_flops"]})
    chosen = knee(trials, noise)
    if chosen is None:
        return None
    full = {**allocation["ranks"], **chosen["ranks"]}   # sites the allocation left dense stay so
    approx_all = {s: rs.KNOBS[config.sites[s].kind].spec(r, config.sites[s].fixed)
                  for s, r in full.items() if r is not None}
    specs = []
    for seed in ref.seeds:
        name = f"refined_s{seed}"
        cfg = rs.experiment_for(base, seed=seed, name=name, run_dir=experiment_dir / TRIALS / name,
                                approx=approx_all)
        specs.append(rs._spec(config, experiment_dir, cfg, name,
                              {"role": "refined", "site": "all", "kind": "refined", "rank": None,
                               "fraction": None, "seed": seed}, rs.TRAIN_FN))
    run_grid(experiment_dir, REFINE_RERUN_TUNE, specs,
             max_concurrent=config.resources.max_concurrent_trials,
             trial_retries=config.failures.trial_retries)
    rows = rs.collect_rows(experiment_dir, specs)
    mean, lo, hi = mean_ci([rs._loss(r, config.allocation.metric) for r in rows if r["status"] == OK])
    out = {"start": key, "sampler": ref.sampler, "noise": noise, "trials": trials,
           "chosen": chosen, "ranks": full, "loss": mean, "ci": [lo, hi]}
    write_json_atomic(experiment_dir / "refined.json", out)
    cfg = rs.experiment_for(base, seed=ref.seeds[0], name=f"{config.name}-refined",
                            run_dir=f"runs/{config.name}-refined", approx=approx_all)
    raw = cfg.to_yaml_dict()
    raw["data"].pop("cache_dir", None)
    (experiment_dir / "refined.yaml").write_text(
        f"# The rank search's refinement ({ref.sampler}) around the {key} allocation: loss {mean:.4f}"
        f" over {len(ref.seeds)} seeds.\n" + yaml.safe_dump(raw, sort_keys=False))
    return out
