#!/usr/bin/env bash
# Install the project on a cluster node, reproducibly:  cluster/install.sh [PYTHON]   (default python3.11)
# The same venv as `make venv` (.venv in the repository, torch first so that nothing pulls another
# build), with every transitive dependency pinned by cluster/constraints.txt (`python -m cluster.lock`
# writes it) and without the test extras: nodes never run the tests. Re-running is cheap: pip keeps
# what already matches.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-python3.11}"
CONSTRAINTS="$REPO/cluster/constraints.txt"
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found on $(hostname)" >&2; exit 2; }
[[ -f "$CONSTRAINTS" ]] || { echo "error: $CONSTRAINTS is missing: run \`python -m cluster.lock\`" >&2; exit 2; }
cd "$REPO"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c "$CONSTRAINTS" torch
.venv/bin/python -m pip install -q -c "$CONSTRAINTS" -e .
