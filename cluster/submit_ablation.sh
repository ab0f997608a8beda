#!/usr/bin/env bash
# Submit the ablation to a running Ray cluster:  cluster/submit_ablation.sh ADDRESS CONFIG [options] [key=value ...]
#   ADDRESS  the Ray dashboard, e.g. http://HEAD:8265 (or an ssh tunnel: http://127.0.0.1:8265)
#   CONFIG   e.g. configs/ablation/gpt2-124m.yaml
# Options are those of `python -m cluster.submit ablation --help` (--out-dir, --token-file, --dry-run, ...).
SUBMIT_SCRIPT="$0" exec bash "$(dirname "${BASH_SOURCE[0]}")/submit_job.sh" ablation "$@"
