#!/usr/bin/env bash
# Train one variant (one experiment config) across the nodes of a DeepSpeed hostfile.
#
#   cluster/deepspeed_train.sh --hostfile cluster/hostfile --config configs/experiments/gpt2-124m.yaml \
#       [--run-dir /shared/runs/gpt2-124m] [--resume] [--master-addr 10.0.0.1] [--master-port 29500] \
#       [--launcher pdsh|openmpi|mpich|impi|mvapich|slurm] [--node-rank N] [--dry-run] [key=value ...]
#
# It runs `deepspeed --hostfile ... --module distributed.train --config ...` from the repository root,
# the same trainer `python -m distributed.train` and Ray Train run. Trailing key=value arguments (or
# everything after `--`) are the trainer's dotted config overrides.
#
# How DeepSpeed starts the ranks (deepspeed/launcher/runner.py):
#   - several hosts: it ssh-es to each one through pdsh (or the MPI/Slurm launcher you name), `cd`s to
#     this same directory and runs the same Python there, so the repository and its .venv must sit at
#     the same path on every node (a shared file system, or identical set-up), with passwordless ssh
#     from this node to the others;
#   - one host that is this machine (e.g. `localhost slots=8`): it starts the ranks locally, no ssh or
#     pdsh involved. DeepSpeed still ssh-checks the first host of any hostfile, so this script passes
#     --no_ssh_check for that case;
#   - --node-rank N: no ssh at all. You start this script on every node yourself (srun, a job array,
#     tmux), each with its rank in the hostfile's order and the same --master-addr.
# NCCL settings come from cluster/nccl.env (variables already set in the environment win); pdsh
# forwards every NCCL_* variable to the other nodes. Anything else the remote ranks need (HF_HOME,
# WANDB_API_KEY, FI_*) goes into ~/.deepspeed_env on this node as KEY=VALUE lines, which DeepSpeed
# forwards too.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

options:
  --hostfile FILE      DeepSpeed hostfile, one `host slots=N` line per node (see cluster/hostfile.example)
  --config FILE        experiment YAML (configs/experiments/...)
  --run-dir DIR        run directory, on storage every node sees (default: the config's out_dir)
  --resume             resume from the run directory's newest checkpoint (the trainer also does it
                       by itself when the run directory holds one)
  --master-addr ADDR   address of the rank-0 node that every rank can reach
                       (default: the hostfile's first host; 127.0.0.1 when that is this machine)
  --master-port PORT   rendezvous port on the master (default 29500; pick another per concurrent run)
  --launcher NAME      multi-node backend: pdsh (default), openmpi, mpich, impi, mvapich, slurm
  --node-rank N        no-ssh mode: this node's index in the hostfile; run the script on every node
  --nccl-env FILE      NCCL settings to export (default cluster/nccl.env)
  --python PATH        interpreter that runs the launcher and the ranks (default .venv/bin/python)
  --dry-run            print the deepspeed command and exit
  -h, --help           this text
EOF
}

die() {
    echo "error: $*" >&2
    echo "(run '$0 --help' for usage)" >&2
    exit 2
}

hostfile="" config="" run_dir="" resume=0 master_addr="" master_port=29500 launcher=pdsh
node_rank="" nccl_env="$HERE/nccl.env" python="" dry_run=0
overrides=()

# Options take their value as the next argument or after `=`.
while (($#)); do
    arg="$1"
    if [[ "$arg" == --*=* ]]; then
        set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
        arg="$1"
    fi
    case "$arg" in
        --hostfile|--config|--run-dir|--master-addr|--master-port|--launcher|--node-rank|--nccl-env|--python)
            (($# >= 2)) || die "$arg needs a value"
            case "$arg" in
                --hostfile) hostfile="$2" ;;
                --config) config="$2" ;;
                --run-dir) run_dir="$2" ;;
                --master-addr) master_addr="$2" ;;
                --master-port) master_port="$2" ;;
                --launcher) launcher="$2" ;;
                --node-rank) node_rank="$2" ;;
                --nccl-env) nccl_env="$2" ;;
                --python) python="$2" ;;
            esac
            shift 2 ;;
        --resume) resume=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; overrides+=("$@"); break ;;
        *=*) overrides+=("$arg"); shift ;;
        *) die "unknown argument '$arg' (trainer overrides are key=value)" ;;
    esac
done

# --- validate everything before starting any process ----------------------------------------------
[[ -n "$hostfile" ]] || die "--hostfile is required (one 'host slots=N' line per node, see cluster/hostfile.example)"
[[ -n "$config" ]] || die "--config is required (an experiment YAML, e.g. configs/experiments/gpt2-124m.yaml)"
[[ -f "$hostfile" ]] || die "hostfile '$hostfile' does not exist"
[[ -f "$config" ]] || die "config '$config' does not exist"
[[ "$master_port" =~ ^[0-9]+$ ]] || die "--master-port must be a number, got '$master_port'"
case "$launcher" in pdsh|openmpi|mpich|impi|mvapich|slurm) ;; *)
    die "--launcher must be one of pdsh, openmpi, mpich, impi, mvapich, slurm; got '$launcher'" ;; esac
[[ -z "$node_rank" || "$node_rank" =~ ^[0-9]+$ ]] || die "--node-rank must be a number, got '$node_rank'"
for item in "${overrides[@]+"${overrides[@]}"}"; do
    [[ "$item" == *=* ]] || die "override '$item' is not of the form key.path=value"
done

# The hostfile, read with DeepSpeed's own rule: `host slots=N`, comments (#) and blank lines skipped.
hosts=()
while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]] \
        || die "hostfile '$hostfile': bad line '$line' (expected 'host slots=N')"
    (( BASH_REMATCH[2] > 0 )) || die "hostfile '$hostfile': host ${BASH_REMATCH[1]} has slots=0"
    hosts+=("${BASH_REMATCH[1]}")
done < "$hostfile"
((${#hosts[@]} > 0)) || die "hostfile '$hostfile' lists no hosts"
if [[ -n "$node_rank" ]] && (( node_rank >= ${#hosts[@]} )); then
    die "--node-rank $node_rank is out of range: the hostfile has ${#hosts[@]} host(s)"
fi

is_this_machine() {
    case "$1" in
        localhost|127.0.0.1|::1|"$(hostname)"|"$(hostname -f 2>/dev/null || hostname)") return 0 ;;
    esac
    return 1
}

launch_mode=()
if [[ -n "$node_rank" ]]; then
    launch_mode=(--no_ssh --node_rank "$node_rank")
elif ((${#hosts[@]} == 1)) && is_this_machine "${hosts[0]}"; then
    launch_mode=(--no_ssh_check)          # local launch: DeepSpeed starts the ranks here, no ssh
elif ((${#hosts[@]} == 1)); then
    launch_mode=(--force_multi --launcher "$launcher")   # one remote node: still go through pdsh/MPI
else
    launch_mode=(--launcher "$launcher")
fi

if [[ -z "$master_addr" ]]; then
    # DeepSpeed would ssh to the first host and take `hostname -I`; the host name itself is what every
    # node already resolves to reach it (the hostfile's own promise).
    master_addr="${hosts[0]}"
    if is_this_machine "$master_addr" && ((${#hosts[@]} == 1)); then master_addr=127.0.0.1; fi
fi

if [[ -z "$python" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then python="$REPO/.venv/bin/python"; else python=python3; fi
fi

# Absolute paths: the ranks run from the repository root, remote ones too.
abspath() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$(pwd)" "$(basename "$1")"); }
hostfile="$(abspath "$hostfile")"
config="$(abspath "$config")"
if [[ -n "$run_dir" && "$run_dir" != /* ]]; then run_dir="$(pwd)/$run_dir"; fi

# The experiment config and overrides, validated here with the trainer's own loader: a typo fails
# now, in one line, instead of on every rank after the fan-out. (--dry-run prints the check.)
validate=("$python" -m cluster.validate experiment "$config" "${overrides[@]+"${overrides[@]}"}")
if ((dry_run)); then
    echo "validate: $(printf '%q ' "${validate[@]}")" >&2
else
    (cd "$REPO" && "${validate[@]}" >/dev/null) || exit 2
fi

# NCCL settings: exported unless the caller already set them.
if [[ -n "$nccl_env" ]]; then
    [[ -f "$nccl_env" ]] || die "--nccl-env '$nccl_env' does not exist"
    while IFS= read -r line || [[ -n "$line" ]]; do
        [[ "$line" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
        key="${BASH_REMATCH[1]}" value="${BASH_REMATCH[2]}"
        [[ -z "${!key+set}" ]] && export "$key=$value"
    done < "$nccl_env"
fi
export PYTHONUNBUFFERED=1

cmd=("$python" -m deepspeed.launcher.runner --hostfile "$hostfile"
     --master_addr "$master_addr" --master_port "$master_port" "${launch_mode[@]}"
     --no_local_rank --module distributed.train --config "$config")
[[ -n "$run_dir" ]] && cmd+=(--run-dir "$run_dir")
((resume)) && cmd+=(--resume)
cmd+=("${overrides[@]+"${overrides[@]}"}")

cd "$REPO"
echo "hosts: ${hosts[*]} | master: $master_addr:$master_port | NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-} NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-} NCCL_DEBUG=${NCCL_DEBUG:-}" >&2
if ((dry_run)); then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
