#!/usr/bin/env bash
# Submit the rank search to a running Ray cluster:  cluster/submit_rank_search.sh ADDRESS CONFIG [options] [key=value ...]
#   ADDRESS  the Ray dashboard, e.g. http://HEAD:8265 (or an ssh tunnel: http://127.0.0.1:8265)
#   CONFIG   e.g. configs/rank_search/gpt2-124m.yaml
# Options are those of `python -m cluster.submit rank-search --help` (--out-dir, --token-file, --dry-run, ...).
set -euo pipefail
if (( $# < 2 )); then
    echo "usage: $0 ADDRESS CONFIG [options] [key=value ...]   (e.g. $0 http://HEAD:8265 configs/rank_search/gpt2-124m.yaml)" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
address="$1" config="$2"
shift 2
# The configs name other files relative to the repository root, so the check runs from there.
[[ -f "$config" ]] && config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
cd "$REPO"
exec "$PYTHON" -m cluster.submit rank-search --address "$address" --config "$config" "$@"
