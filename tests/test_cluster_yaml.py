"""cluster.yaml, checked offline: Ray's own cluster-config schema plus the recipe's needs.

``ray up`` has no dry run; Ray validates a cluster config with ``prepare_config`` (merge with the
provider's defaults.yaml) followed by ``validate_config`` (``ray/autoscaler/ray-schema.json``),
neither of which calls the cloud. Our checks add what the recipe needs: 4 H100 GPUs in the GPU
group, pinned torch / Ray, semlab installed from the synced tree, environment settings for the
dataset and MLflow without credentials, and head services bound to loopback.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
A3_GPUS = {"a3-highgpu-1g": 1, "a3-highgpu-2g": 2, "a3-highgpu-4g": 4, "a3-highgpu-8g": 8}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([\w.]+)$", dep)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _commands(config: dict, key: str) -> str:
    return "\n".join(config.get(key) or [])


def test_ray_accepts_the_config(prepared):
    assert prepared["provider"]["type"] == "gcp"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    for name, node_type in prepared["available_node_types"].items():
        assert "resources" in node_type and "node_config" in node_type, name


def test_schema_is_enforced(raw):
    """The validator is live: the same config without resources on a node type is rejected."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw)
    del broken["available_node_types"]["gpu_h100x4"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_gpu_group_has_four_h100(prepared):
    gpu_types = {
        n: t for n, t in prepared["available_node_types"].items() if t["resources"].get("GPU", 0) > 0
    }
    assert len(gpu_types) == 1, gpu_types.keys()
    (node_type,) = gpu_types.values()
    total = node_type["resources"]["GPU"] * node_type["max_workers"]
    assert total == 4 and node_type["min_workers"] == node_type["max_workers"] == 1
    machine = node_type["node_config"]["machineType"]
    assert A3_GPUS.get(machine) == node_type["resources"]["GPU"], (
        f"{machine} does not carry the advertised GPUs"
    )
    # the cluster-wide cap leaves room for the GPU node and the CPU group
    assert prepared["max_workers"] >= sum(
        t.get("max_workers", 0)
        for t in prepared["available_node_types"].values()
        if t is not prepared["available_node_types"][prepared["head_node_type"]]
    )


def test_cpu_group_autoscales_for_ray_data(prepared):
    cpu = prepared["available_node_types"]["cpu_data"]
    assert cpu["resources"].get("GPU", 0) == 0 and cpu["resources"]["CPU"] > 0
    assert cpu["min_workers"] == 0 < cpu["max_workers"]
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU", 0) == 0, "the head should not take training or data tasks"


def test_pinned_software(raw):
    import ray

    pins = _pins()
    setup = _commands(raw, "setup_commands")
    assert f"torch=={pins['torch']}" in setup and pins["torch"] == "2.14.1"
    assert f"torchvision=={pins['torchvision']}" in setup
    assert "-e ~/semlab" in setup and raw["file_mounts"]["~/semlab"] == "."
    image = raw["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{pins['ray']}-"), image
    assert pins["ray"] == ray.__version__


def test_environment_settings_without_credentials(raw):
    setup = _commands(raw, "setup_commands")
    for var in ("SEMLAB_ROOT", "SEMLAB_DATASET", "SEMLAB_RAY_STORAGE", "MLFLOW_TRACKING_URI"):
        assert f"export {var}=" in setup, var
    text = CLUSTER_YAML.read_text()
    for secret in (
        r"AWS_SECRET",
        r"AKIA[0-9A-Z]{12}",
        r"PRIVATE KEY",
        r"(?i)password\s*[:=]",
        r"(?i)token\s*[:=]",
    ):
        assert not re.search(secret, text), f"cluster.yaml must not hold credentials ({secret})"
    assert "ssh_private_key" not in raw.get("auth", {})


def test_head_services_bound_sensibly(raw):
    start = _commands(raw, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert "--port=6379" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "$RAY_HEAD_IP:6379" in _commands(raw, "worker_start_ray_commands")


def test_head_gcs_requires_the_ray_auth_token(raw):
    """The GCS port is open to the VPC: without token auth anyone who reaches it can run code."""
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = _commands(raw, section)
        assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray-auth/auth_token;" in start, section
        assert start.index("RAY_AUTH_MODE=token") < start.index("ray start"), section
    assert raw["file_mounts"].get("~/.ray-auth") == "~/.ray-auth"  # the shared token reaches every node


def test_every_worker_type_has_storage_credentials(raw):
    """Ray's GCP launcher gives only the head a service account: the GPU and CPU node types, which
    read gs:// shards and upload checkpoints, must name one with the cloud-platform scope."""
    for name, node_type in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue
        accounts = node_type["node_config"].get("serviceAccounts")
        assert accounts, f"node type {name} has no service account"
        assert accounts[0]["email"].endswith(".iam.gserviceaccount.com")
        assert "https://www.googleapis.com/auth/cloud-platform" in accounts[0]["scopes"]


def test_mlflow_server_and_job_placement_are_documented(raw):
    start = _commands(raw, "head_start_ray_commands")
    assert "mlflow server" in start and "--artifacts-destination gs://" in start and "0.0.0.0" not in start
    assert "--entrypoint-num-cpus" in CLUSTER_YAML.read_text()
    assert "MLFLOW_TRACKING_URI=http://${RAY_HEAD_IP" in _commands(raw, "setup_commands")
