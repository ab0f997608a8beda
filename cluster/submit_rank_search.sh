#!/usr/bin/env bash
# Submit the rank search to a running Ray cluster:  cluster/submit_rank_search.sh ADDRESS CONFIG [options] [key=value ...]
#   ADDRESS  the Ray dashboard, e.g. http://HEAD:8265 (or an ssh tunnel: http://127.0.0.1:8265)
#   CONFIG   e.g. configs/rank_search/gpt2-124m.yaml
# Options are those of `python -m cluster.submit rank-search --help` (--out-dir, --token-file, --dry-run, ...).
SUBMIT_SCRIPT="$0" exec bash "$(dirname "${BASH_SOURCE[0]}")/submit_job.sh" rank-search "$@"
