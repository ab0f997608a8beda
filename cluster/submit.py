"""Submit the ablation or the rank search to a running Ray cluster, follow it, fetch its results back.

    python -m cluster.submit ablation    --address http://HEAD:8265 --config configs/ablation/gpt2-124m.yaml
    python -m cluster.submit rank-search --address http://HEAD:8265 --config configs/rank_search/gpt2-124m.yaml \\
        [--from-ablation /mnt/shared/runs/ablation-gpt2-124m]
    python -m cluster.submit fetch --config configs/ablation/gpt2-124m.yaml --cluster-config cluster/ray-aws.yaml
    python -m cluster.submit fetch --config configs/ablation/gpt2-124m.yaml --head ubuntu@HEAD

(`cluster/submit_ablation.sh ADDRESS CONFIG` and `cluster/submit_rank_search.sh ADDRESS CONFIG` are
the same as the first two.) A submission goes through Ray's job API (`JobSubmissionClient`, what
`ray job submit` calls) with:

- the repository as the job's working directory (uploaded, minus .venv/, runs/ and other local
  state), so the cluster runs exactly the code you have checked out;
- the experiment directory on the cluster's shared file system (`--shared-dir`, /mnt/shared in the
  cluster/ray-*.yaml files): every trial's run directory, checkpoints and the report land there,
  because Ray Train workers on different nodes must all reach them, and so that re-running the same
  command finds the interrupted experiment and resumes it;
- the token cache and the Hugging Face cache on the same shared file system (built once, by the
  driver, before the trials start), and the NCCL settings of cluster/nccl.env, as runtime-env
  variables that every trial's workers inherit.

Everything is checked here, before anything is sent: the address, the config file (loaded and
validated with the same code the job runs), the token settings. Then the job is submitted, the
commands to follow, stop and fetch it are printed, and its logs are followed until it ends (the exit
status is the job's: 0 when it succeeded; Ctrl-C stops following, the job keeps running).

Secrets: `--env KEY=VALUE` values (e.g. WANDB_API_KEY) travel only inside the job API request; every
line printed here shows them as <hidden>, and no command line holds them. Prefer `--env KEY`, which
forwards this shell's value, so the secret is not on this command's own command line either.

Token authentication (Ray >= 2.52; a shared cluster should use it): the cluster is started with
RAY_AUTH_MODE=token and a token on every node. The client sends the token only when RAY_AUTH_MODE=token
is set in its own environment; it reads it from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH,
else ~/.ray/auth_token. `--token-file FILE` sets both for the ray CLI this command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.validate import ValidationFailed, validate

REPO = Path(__file__).resolve().parents[1]
NCCL_ENV = REPO / "cluster" / "nccl.env"
DEFAULT_SHARED_DIR = "/mnt/shared"

# Local state that must not be uploaded with the working directory (Ray caps it at a few hundred
# MiB, and a stale run directory would shadow the experiment directory on the cluster).
WORKING_DIR_EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info",
                        "wandb"]

ENTRYPOINT_MODULES = {"ablation": "tune.ablation", "rank-search": "tune.rank_search"}
GCS_PORT = "6379"
HIDDEN = "<hidden>"


class SubmitError(ValueError):
    """A problem with what the user asked for, found before anything is sent to the cluster."""


@dataclass(frozen=True)
class Submission:
    name: str                 # the experiment's name (from the config)
    submission_id: str
    address: str
    out_dir: str              # the experiment directory on the cluster
    runtime_env: dict
    entrypoint: list[str]

    hidden: tuple[str, ...] = ()   # runtime-env variables whose values are never printed

    def command(self, ray_cli: str) -> list[str]:
        """The equivalent `ray job submit` command, for people to read: hidden values masked."""
        env = dict(self.runtime_env)
        env["env_vars"] = {k: HIDDEN if k in self.hidden else v for k, v in env["env_vars"].items()}
        return [ray_cli, "job", "submit", "--address", self.address,
                "--submission-id", self.submission_id,
                "--runtime-env-json", json.dumps(env, sort_keys=True),
                "--no-wait", "--", *self.entrypoint]


def resolve_address(address: str | None) -> str:
    """The dashboard (job server) address: --address, else Ray's own RAY_API_SERVER_ADDRESS / RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard, "
                          "which serves the job API) or set RAY_ADDRESS")
    if address.rstrip("/").endswith(":" + GCS_PORT):
        raise SubmitError(f"--address {address} is the GCS port; jobs are submitted to the dashboard, "
                          "usually http://HEAD:8265")
    return address


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of cluster/nccl.env; comments and blank lines skipped."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def load_experiment_name(kind: str, config: str, overrides: list[str]) -> str:
    """Validate the config with the code the job will run; return its name."""
    try:
        return validate(kind, config, overrides)
    except ValidationFailed as exc:
        raise SubmitError(str(exc)) from None


def runtime_env(shared_dir: str, extra_env: dict[str, str]) -> dict:
    env = {"APPROXGPT_CACHE": f"{shared_dir}/cache", "HF_HOME": f"{shared_dir}/huggingface",
           "PYTHONUNBUFFERED": "1"}
    # NCCL settings: cluster/nccl.env, with this shell's own NCCL_* values winning (as in the
    # deepspeed wrapper), then explicit --env values.
    for key, value in read_env_file(NCCL_ENV).items():
        env[key] = os.environ.get(key, value)
    env.update(extra_env)
    return {"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env}


def parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):   # the value may be a secret: never shown
            raise SubmitError(f"--env {key!r}=...: {key!r} is not a variable name (letters, digits, _; "
                              "e.g. --env WANDB_API_KEY)")
        if not sep:  # --env KEY: forward this shell's value (e.g. WANDB_API_KEY)
            if key not in os.environ:
                raise SubmitError(f"--env {key}: not set in this shell; use --env {key}=VALUE")
            value = os.environ[key]
        out[key] = value
    return out


def token_environment(token_file: str | None) -> dict[str, str]:
    """Environment for the ray CLI so that it sends the cluster's auth token."""
    env = dict(os.environ)
    if token_file:
        if not Path(token_file).expanduser().is_file():
            raise SubmitError(f"--token-file {token_file!r} does not exist (on the head node: "
                              "`ray get-auth-token` prints the cluster's token)")
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).expanduser().resolve())
        env["RAY_AUTH_MODE"] = "token"
    elif "RAY_AUTH_MODE" not in env and (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
        # A token without the mode is silently not sent: the client only attaches it in token mode.
        env["RAY_AUTH_MODE"] = "token"
    return env


def build_submission(args: argparse.Namespace) -> Submission:
    address = resolve_address(args.address)
    if not args.config:
        raise SubmitError("--config is required (e.g. configs/ablation/gpt2-124m.yaml)")
    name = load_experiment_name(args.kind, args.config, args.overrides)
    out_dir = args.out_dir or f"{args.shared_dir}/runs/{name}"
    if not out_dir.startswith("/"):
        raise SubmitError(f"--out-dir {out_dir!r} must be an absolute path on the cluster's shared "
                          "file system (a relative one would land in the job's temporary working dir)")
    config = str(Path(args.config).resolve().relative_to(REPO)) if Path(args.config).resolve() \
        .is_relative_to(REPO) else None
    if config is None:
        raise SubmitError(f"config {args.config!r} is outside the repository {REPO}; only the "
                          "repository is uploaded, so put the config under configs/")
    entrypoint = ["python", "-m", ENTRYPOINT_MODULES[args.kind], "--config", config,
                  "--out-dir", out_dir]
    if args.kind == "rank-search" and args.from_ablation:
        entrypoint += ["--from-ablation", args.from_ablation]
    entrypoint += args.overrides
    submission_id = args.submission_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    extra_env = parse_env(args.env)
    return Submission(name, submission_id, address, out_dir,
                      runtime_env(args.shared_dir, extra_env), entrypoint, hidden=tuple(extra_env))


def ray_cli() -> str:
    # The ray next to this interpreter: the client must match the cluster's Ray version.
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise SubmitError("the `ray` command is not installed next to this Python; run `make venv`")
    return found


def quoted(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def job_client(address: str, env: dict[str, str]):
    """Ray's JobSubmissionClient for `address`, sending the token that `env` (token_environment's
    result) configures. Raises SubmitError when the job server cannot be reached."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # the client reads them here
        if key in env:
            os.environ[key] = env[key]
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray job server at {address} ({exc}); is the cluster up, "
                          "and is the dashboard port (8265) forwarded?") from None


def _http_status(exc: Exception) -> int | None:
    """The HTTP status of a failed job API request: JobSubmissionClient raises RuntimeError("Request
    failed with status code N: ...") and keeps no other record of it."""
    match = re.match(r"Request failed with status code (\d{3})", str(exc))
    return int(match.group(1)) if match else None


def submit_job(client, submission: Submission, patience_s: float = 90) -> str:
    """Submit through the job API. A server-side failure (HTTP 5xx: the head's job agent still
    starting, seconds after `ray start`) is retried every few seconds for `patience_s`, unless the
    job exists by then (the submission id makes a retry safe); any other failure is raised."""
    deadline = time.time() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=shlex.join(submission.entrypoint),
                                     submission_id=submission.submission_id,
                                     runtime_env=submission.runtime_env)
        except RuntimeError as exc:
            status = _http_status(exc)
            if status is None or status < 500 or time.time() > deadline:
                raise SubmitError(f"the job server refused the submission: {exc}") from None
        if _job_exists(client, submission.submission_id):
            return submission.submission_id
        time.sleep(3)


def _job_exists(client, submission_id: str) -> bool:
    try:
        client.get_job_info(submission_id)
        return True
    except RuntimeError:
        return False


def follow_job(client, submission_id: str, out=None) -> str:
    """Print the job's logs as they come until it ends; return its final status (e.g. SUCCEEDED)."""
    import asyncio

    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", file=out, flush=True)

    asyncio.run(tail())
    while not (status := client.get_job_status(submission_id)).is_terminal():
        time.sleep(1)   # the log stream can end a moment before the status does
    return str(status.value)


def submit(args: argparse.Namespace) -> int:
    submission = build_submission(args)
    env = token_environment(args.token_file)
    command = submission.command("ray")
    address = submission.address
    print(f"experiment {submission.name!r} -> {submission.out_dir} on the cluster")
    print(f"submit:  {quoted(command)}")
    if args.dry_run:
        return 0
    client = job_client(address, env)
    sid = submit_job(client, submission)
    print(f"submitted job {sid}")
    qsid = shlex.quote(sid)
    print(f"follow:  ray job logs --address {address} --follow {qsid}\n"
          f"status:  ray job status --address {address} {qsid}\n"
          f"stop:    ray job stop --address {address} {qsid}\n"
          f"fetch:   python -m cluster.submit fetch --config {args.config} "
          f"(--cluster-config cluster/ray-aws.yaml | --head USER@HEAD)\n"
          "resume:  re-run this same command (finished trials are kept)")
    if args.no_follow:
        return 0
    try:
        status = follow_job(client, sid)
    except KeyboardInterrupt:
        print("\nstopped following; the job keeps running on the cluster", file=sys.stderr)
        return 0
    print(f"job {sid}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def fetch_command(args: argparse.Namespace) -> list[str]:
    if args.remote_dir:
        remote = args.remote_dir
    elif args.config:
        remote = f"{args.shared_dir}/runs/{load_experiment_name(args.kind_of_config, args.config, [])}"
    else:
        raise SubmitError("fetch needs --config (the one you submitted) or --remote-dir")
    dest = Path(args.dest) / Path(remote).name
    if args.cluster_config:
        if not Path(args.cluster_config).is_file():
            raise SubmitError(f"--cluster-config {args.cluster_config!r} does not exist")
        if args.exclude:
            raise SubmitError("--exclude works with --head (plain rsync); `ray rsync-down` has no "
                              "exclude option")
        return ["ray", "rsync-down", args.cluster_config, f"{remote}/", f"{dest}/"]
    if args.head:
        excludes = [f"--exclude={pattern}" for pattern in args.exclude]
        return ["rsync", "-az", "--partial", "--info=progress2", *excludes,
                f"{args.head}:{remote}/", f"{dest}/"]
    raise SubmitError("fetch needs --cluster-config FILE (a cluster started with `ray up`) or "
                      "--head USER@HOST (any cluster you can ssh to)")


def fetch(args: argparse.Namespace) -> int:
    command = fetch_command(args)
    print(f"fetch:   {quoted(command)}")
    if args.dry_run:
        return 0
    Path(command[-1]).mkdir(parents=True, exist_ok=True)
    if command[0] == "ray":
        command[0] = ray_cli()
    return subprocess.run(command).returncode


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for kind in ENTRYPOINT_MODULES:
        s = sub.add_parser(kind, help=f"submit `python -m {ENTRYPOINT_MODULES[kind]}` as a Ray job")
        s.set_defaults(kind=kind)
        s.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 "
                                         "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
        s.add_argument("--config", help="the YAML, a path inside this repository")
        s.add_argument("--shared-dir", default=DEFAULT_SHARED_DIR,
                       help="shared file system on every node (default %(default)s)")
        s.add_argument("--out-dir", help="experiment directory on the cluster "
                                         "(default: SHARED_DIR/runs/<config name>)")
        if kind == "rank-search":
            s.add_argument("--from-ablation", help="the ablation's experiment directory on the cluster")
        s.add_argument("--submission-id", help="default: <config name>-<date>-<time>")
        s.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                       help="extra runtime-env variable; KEY alone forwards this shell's value")
        s.add_argument("--token-file", help="the cluster's auth token (token authentication)")
        s.add_argument("--no-follow", action="store_true", help="submit and return")
        s.add_argument("--dry-run", action="store_true", help="check and print, submit nothing")
        s.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides of the ablation / rank-search config")
    f = sub.add_parser("fetch", help="copy the experiment directory from the cluster")
    f.add_argument("--config", help="the config you submitted (names the experiment directory)")
    f.add_argument("--kind", dest="kind_of_config", choices=list(ENTRYPOINT_MODULES),
                   default="ablation", help="what --config is (default %(default)s)")
    f.add_argument("--shared-dir", default=DEFAULT_SHARED_DIR)
    f.add_argument("--remote-dir", help="experiment directory on the cluster (instead of --config)")
    f.add_argument("--cluster-config", help="cluster YAML the cluster was started with (`ray up`)")
    f.add_argument("--head", help="USER@HOST of the head node (plain rsync over ssh)")
    f.add_argument("--exclude", action="append", default=[],
                   help="rsync pattern to skip (with --head), e.g. 'checkpoints/'")
    f.add_argument("--dest", default="runs", help="local folder (default %(default)s)")
    f.add_argument("--dry-run", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return fetch(args) if args.command == "fetch" else submit(args)
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
