"""The Ray cluster launcher files are checked with Ray's own validation (ray-schema.json and the checks
`ray up` runs before it touches a cloud), so a typo in cluster/ray-*.yaml fails here, not on a cluster."""
import copy
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
FILES = sorted(CLUSTER.glob("ray-*.yaml"))
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_up_validation(raw: dict) -> dict:
    """What `ray up` does with the file before calling the cloud: the raw file against the schema,
    then defaults filled in (per provider) and the result validated again."""
    jsonschema.validate(raw, SCHEMA)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def test_all_three_launcher_files_exist():
    assert {p.name for p in FILES} == {"ray-aws.yaml", "ray-gcp.yaml", "ray-onprem.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_passes_rays_validation(path):
    prepared = ray_up_validation(load(path))
    # The provider section is free-form in the schema; hold its keys to the ones Ray documents.
    unknown = set(load(path)["provider"]) - set(SCHEMA["properties"]["provider"]["properties"])
    assert not unknown, f"{path.name}: unknown provider keys {unknown}"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", [p for p in FILES if p.name != "ray-onprem.yaml"], ids=lambda p: p.name)
def test_cloud_files_have_cpu_head_and_autoscaling_gpu_workers(path):
    raw = load(path)
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert gpu_types, "no worker node type"
    for t in gpu_types:
        assert t.get("min_workers", 0) == 0 < t["max_workers"] <= raw["max_workers"]
    # the GPU type is named for its 8 GPUs, which the 8-GPU trials of configs/ablation/gpt2-124m.yaml need
    assert any("8x" in name for name in types)


def test_onprem_file_lists_head_and_worker_ips():
    provider = load(CLUSTER / "ray-onprem.yaml")["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]
    assert provider["head_ip"] not in provider["worker_ips"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_nodes_install_the_locked_project_and_run_ray_from_its_venv(path):
    raw = load(path)
    assert any("cluster/install.sh" in c for c in raw["setup_commands"])
    assert not any("make venv" in c or "[test]" in c for c in raw["setup_commands"])
    assert raw["file_mounts"]["~/approxgpt"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert start and all(".venv/bin/activate" in c and "RAY_AUTH_MODE=token" in c for c in start)
    # the job server that `ray job submit` talks to lives in ray[default]
    assert any("ray[default]==" in c and "-c ~/approxgpt/cluster/constraints.txt" in c
               for c in raw["head_setup_commands"])
    for local_state in (".venv", "runs"):
        assert local_state in raw["rsync_exclude"]


@pytest.mark.parametrize("typo", [
    {"setup_comands": ["echo hi"]},              # top-level key
    {"idle_timeout_minute": 5},                  # top-level key
])
def test_a_typo_at_the_top_level_is_rejected(typo):
    raw = load(CLUSTER / "ray-aws.yaml")
    raw.update(typo)
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        ray_up_validation(raw)


def test_a_typo_in_a_node_type_is_rejected():
    raw = load(CLUSTER / "ray-gcp.yaml")
    node_type = next(iter(raw["available_node_types"].values()))
    node_type["max_worker"] = node_type.pop("max_workers", 4)
    with pytest.raises(jsonschema.ValidationError):
        ray_up_validation(raw)


def test_a_head_type_that_does_not_exist_is_rejected():
    raw = load(CLUSTER / "ray-aws.yaml")
    raw["head_node_type"] = "head_gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_up_validation(raw)


LAUNCH_FILES = sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("*.sh"), *CLUSTER.glob("*.sbatch"),
                       CLUSTER.parent / "Makefile"])


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_every_ray_head_binds_its_dashboard_to_loopback(path):
    """The dashboard serves the job API (code execution): 127.0.0.1 serves every documented access
    route (`ray dashboard`'s SSH tunnel, `ssh -L`), so no launch file exposes it on the network."""
    text = path.read_text()
    hosts = re.findall(r"--dashboard-host[= ](\S+)", text)
    assert all(h.strip("'\"") == "127.0.0.1" for h in hosts), f"{path.name}: {hosts}"
    # every head a file starts names the host (Ray's own default has changed between versions)
    heads = [m.start() for m in re.finditer(r"ray start\s+--head", text)]
    assert len(hosts) >= len(heads), f"{path.name}: a `ray start --head` without --dashboard-host"
    assert "0.0.0.0" not in text, f"{path.name} binds something to every interface"


def test_the_install_script_uses_the_constraints_and_no_test_extras():
    script = (CLUSTER / "install.sh").read_text()
    installs = [l for l in script.splitlines() if "pip install" in l and "--upgrade pip" not in l]
    assert installs and all('-c "$CONSTRAINTS"' in l for l in installs)
    assert "[test]" not in script
    subprocess.run(["bash", "-n", str(CLUSTER / "install.sh")], check=True)


def test_constraints_are_the_generated_run_time_closure(tmp_path):
    """cluster/constraints.txt is what `python -m cluster.lock` writes: the header names the command,
    every direct dependency is pinned at pyproject.toml's version, and the test extras are absent."""
    from cluster import lock

    text = (CLUSTER / "constraints.txt").read_text()
    assert text.startswith(lock.HEADER)
    pins = dict(line.split("==") for line in text.splitlines() if not line.startswith("#"))
    for req in lock.project_requirements():
        (version,) = [s.version for s in req.specifier]
        assert pins[canonicalize_name(req.name)] == version, req
    assert "pytest" not in pins and "transformers" not in pins
    assert all("+" not in v for v in pins.values())   # no local labels: a GPU node gets the CUDA build
    # The generator itself: the closure of this venv; --check tells a stale file from a fresh one.
    out = tmp_path / "c.txt"
    assert lock.main(["--output", str(out)]) == 0 and lock.main(["--check", "--output", str(out)]) == 0
    generated = dict(line.split("==") for line in out.read_text().splitlines() if not line.startswith("#"))
    assert {"ray", "torch", "deepspeed", "aiohttp", "pydantic-core"} <= set(generated)
    assert "pytest" not in generated and "transformers" not in generated
    out.write_text(out.read_text() + "extra==1.0\n")
    assert lock.main(["--check", "--output", str(out)]) == 1
