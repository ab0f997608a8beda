#!/usr/bin/env bash
# What submit_ablation.sh and submit_rank_search.sh run:  cluster/submit_job.sh MODE ADDRESS CONFIG [options] [key=value ...]
#   MODE     ablation | rank-search (the `python -m cluster.submit` subcommand)
#   ADDRESS  the Ray dashboard, e.g. http://HEAD:8265 (or an ssh tunnel: http://127.0.0.1:8265)
#   CONFIG   e.g. configs/ablation/gpt2-124m.yaml
# Options are those of `python -m cluster.submit MODE --help` (--out-dir, --token-file, --dry-run, ...).
set -euo pipefail
mode="${1:-}"
if [[ "$mode" != ablation && "$mode" != rank-search ]]; then
    echo "usage: $0 ablation|rank-search ADDRESS CONFIG [options] [key=value ...]" >&2
    exit 2
fi
if (( $# < 3 )); then
    script="${SUBMIT_SCRIPT:-$0 $mode}"  # the wrapper the user ran, if any
    echo "usage: $script ADDRESS CONFIG [options] [key=value ...]   (e.g. $script http://HEAD:8265 configs/${mode//-/_}/gpt2-124m.yaml)" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
address="$2" config="$3"
shift 3
# The configs name other files relative to the repository root, so the check runs from there.
[[ -f "$config" ]] && config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
cd "$REPO"
exec "$PYTHON" -m cluster.submit "$mode" --address "$address" --config "$config" "$@"
