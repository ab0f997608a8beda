"""Validate a config the way the job will, before anything is launched: one line per problem, exit 2.

    python -m cluster.validate experiment configs/experiments/gpt2-124m.yaml [key=value ...]
    python -m cluster.validate ablation configs/ablation/gpt2-124m.yaml [key=value ...]
    python -m cluster.validate rank-search configs/rank_search/gpt2-124m.yaml [key=value ...]

The shell launchers (cluster/deepspeed_train.sh, cluster/slurm_ray.sbatch) run it first, so a typo
fails here in a second instead of on every rank after the pdsh / srun fan-out; cluster.submit calls
`validate` in-process. It runs the same loaders the trainer and the Tune drivers run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

KINDS = ("experiment", "ablation", "rank-search")


class ValidationFailed(ValueError):
    """The config (or its path) is not one the job would accept; the message says why."""


def validate(kind: str, config: str, overrides: list[str]) -> str:
    """Load and validate `config` as `kind`; return its name. Raises ValidationFailed."""
    if kind not in KINDS:
        raise ValidationFailed(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    path = Path(config)
    if not path.is_file():
        raise ValidationFailed(f"config {config!r} does not exist (see configs/experiments/, "
                               "configs/ablation/ and configs/rank_search/)")
    from distributed.config import ConfigError

    try:
        if kind == "experiment":
            from distributed.config import load_config

            return load_config(path, overrides).name
        if kind == "ablation":
            from tune.grid import expand, load_ablation, validate_grid

            ablation = load_ablation(path, overrides)
            validate_grid(expand(ablation))
            return ablation.name
        from tune.rank_search import check_space, load_rank_search

        search = load_rank_search(path, overrides)
        check_space(search)
        return search.name
    except ConfigError as exc:
        raise ValidationFailed(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        name = validate(args.kind, args.config, args.overrides)
    except ValidationFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.kind} config {args.config} ({name}): valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
