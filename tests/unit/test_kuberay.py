"""docker/kuberay/raycluster.yaml: linted with yamllint (a dev dependency) and checked structurally.

No Kubernetes cluster and no KubeRay operator here, so the manifest is never applied in the test suite; these tests
catch what can be caught without one: YAML lint findings, and the shape the README promises (a CPU head, one
one-GPU worker group per GPU kind that Ray can target with accelerator_type, one image, /w shared everywhere),
plus the few KubeRay rules that the operator enforces and that a reader could break by editing
(ray-operator/controllers/ray/utils/validation.go and common/pod.go in ray-project/kuberay).
"""

import json
import re
import shlex
from pathlib import Path

import pytest

try:
    import yaml
    from yamllint import linter
    from yamllint.config import YamlLintConfig
except ImportError:  # a dev dependency: fail, do not skip, so a missing install cannot pass unnoticed
    linter = None

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "docker" / "kuberay" / "raycluster.yaml"
README = REPO / "docker" / "kuberay" / "README.md"
# yamllint's default rules (document start, indentation, duplicate keys, truthy values, trailing spaces, ...) with
# this repo's line length; every finding, warning or error, fails the lint.
STRICT_CONFIG = "extends: default\nrules:\n  line-length:\n    max: 120\n"
GPU_KINDS = {"A100", "H100", "L4"}
PVC = "trtglm-work"
# Ray's name for an NVIDIA GPU kind: the word after the vendor in the NVML device name ("NVIDIA H100 80GB HBM3"
# -> "H100"); ray/_private/accelerators/nvidia_gpu.py, NVIDIA_GPU_NAME_PATTERN.
RAY_NVIDIA_NAME = re.compile(r"\w+\s+([A-Z0-9]+)")


def _need_yamllint():
    if linter is None:
        pytest.fail("yamllint not installed: pip install yamllint (a dev dependency: pip install -e '.[dev]')")


def _lint(text: str) -> list:
    _need_yamllint()
    return list(linter.run(text, YamlLintConfig(STRICT_CONFIG)))


def _manifest() -> dict:
    _need_yamllint()  # PyYAML comes with yamllint
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert len(docs) == 1, "one document: the RayCluster (the PVC is a prerequisite, see the README)"
    return docs[0]


def _groups(cluster: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head and every worker group."""
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _ray_resources(group: dict) -> dict:
    """The custom resources of rayStartParams['resources'], read the three ways they are read on a cluster."""
    value = group["rayStartParams"].get("resources")
    if value is None:
        return {}
    # 1. KubeRay passes it as `ray start --resources=<value>` inside `bash -c`: what ray start receives is JSON.
    word = shlex.split(f"--resources={value}")
    assert len(word) == 1, f"{value!r}: must be one shell word"
    passed = json.loads(word[0].partition("=")[2])
    # 2. The Ray autoscaler (kuberay/autoscaling_config.py, _get_custom_resources) drops the first and last
    #    character and the backslashes, then wants a JSON object of int values.
    seen_by_autoscaler = json.loads(value[1:-1].replace("\\", ""))
    assert all(isinstance(v, int) for v in seen_by_autoscaler.values()), f"{value!r}: int values for the autoscaler"
    # 3. KubeRay (common/pod.go, getResourcesMap) trims quotes and spaces and unmarshals the rest.
    seen_by_kuberay = json.loads(value.strip("'\"` "))
    assert passed == seen_by_autoscaler == seen_by_kuberay
    return passed


def _accelerator_kind(group: dict) -> str:
    kinds = [key.partition(":")[2] for key in _ray_resources(group) if key.startswith("accelerator_type:")]
    assert len(kinds) == 1, f"{group['groupName']}: declare exactly one accelerator_type:<KIND> resource"
    return kinds[0]


def _gpu_product_values(pod_spec: dict) -> list[str]:
    """The nvidia.com/gpu.product values a pod may land on: nodeSelector or required node affinity."""
    values = []
    if "nvidia.com/gpu.product" in pod_spec.get("nodeSelector", {}):
        values.append(pod_spec["nodeSelector"]["nvidia.com/gpu.product"])
    required = (pod_spec.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution", {}))
    for term in required.get("nodeSelectorTerms", []):
        for expression in term.get("matchExpressions", []):
            if expression["key"] == "nvidia.com/gpu.product":
                assert expression["operator"] == "In"
                values += expression["values"]
    return values


# ---- lint ---------------------------------------------------------------------------------------------------------

def test_manifest_passes_yamllint():
    problems = _lint(MANIFEST.read_text())
    assert problems == [], "\n".join(f"line {p.line}: {p.level} {p.rule}: {p.desc}" for p in problems)


@pytest.mark.parametrize("bad, rule", [
    ("---\nspec:\n  replicas: 1\n  replicas: 2\n", "key-duplicates"),
    ("---\nspec:\n    replicas: 1\nmetadata:\n  name: x\n", "indentation"),
    ("---\nspec:\n  replicas: 1\n   minReplicas: 0\n", None),  # not YAML at all: a syntax error
    ("---\nname: " + "x" * 130 + "\n", "line-length"),
], ids=["duplicate-key", "bad-indentation", "syntax-error", "long-line"])
def test_yamllint_flags_a_bad_manifest(bad, rule):
    # Proves the lint above is real: the same config does fail bad files, on the rule we expect.
    problems = _lint(bad)
    assert problems, f"no finding for {bad!r}"
    assert rule in {p.rule for p in problems}, [f"{p.rule}: {p.desc}" for p in problems]
    if rule is None:
        assert any(p.level == "error" and "syntax error" in p.desc for p in problems)


# ---- structure ----------------------------------------------------------------------------------------------------

def test_manifest_is_a_raycluster():
    cluster = _manifest()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    name = cluster["metadata"]["name"]
    # KubeRay: a DNS-1035 label of at most 53 characters (utils.MaxRayClusterNameLength); the README's service name.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 53
    assert f"{name}-head-svc" in README.read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+", cluster["spec"]["rayVersion"])
    # Worker groups start at 0 pods: without the autoscaler nothing would ever start them.
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


def test_head_is_cpu_only():
    head = _manifest()["spec"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    for part in ("requests", "limits"):
        assert not any("gpu" in key for key in container["resources"][part]), "the head has no GPU"
    assert "num-gpus" not in head["rayStartParams"] and not _ray_resources(head)
    assert {"gcs-server", "dashboard", "client"} <= {p["name"] for p in container["ports"]}


def test_one_gpu_worker_group_per_gpu_kind():
    workers = _manifest()["spec"]["workerGroupSpecs"]
    kinds = [_accelerator_kind(group) for group in workers]
    assert sorted(kinds) == sorted(GPU_KINDS), "one worker group per GPU kind of the build matrix"
    names = [group["groupName"] for group in workers]
    assert len(set(names)) == len(names)
    for group, kind in zip(workers, kinds):
        name = group["groupName"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), f"{name}: a DNS-1123 label"
        assert kind.lower() in name
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}: scale from 0"
        assert group["maxReplicas"] >= 1
        # One GPU per pod, told to Ray explicitly (the autoscaler reads num-gpus to know what a group offers).
        assert group["rayStartParams"]["num-gpus"] == "1", name
        container = group["template"]["spec"]["containers"][0]
        for part in ("requests", "limits"):
            assert str(container["resources"][part]["nvidia.com/gpu"]) == "1", f"{name}: {part} nvidia.com/gpu: 1"


def test_worker_groups_land_on_their_gpu_kind():
    for group in _manifest()["spec"]["workerGroupSpecs"]:
        name, kind = group["groupName"], _accelerator_kind(group)
        pod = group["template"]["spec"]
        products = _gpu_product_values(pod)
        assert products, f"{name}: select nodes by nvidia.com/gpu.product"
        for product in products:
            # GPU Feature Discovery writes the NVML name with dashes for spaces; Ray would detect the same kind on
            # that node as the group declares (nvidia_gpu.py's pattern on "NVIDIA A100-SXM4-80GB" -> "A100").
            match = RAY_NVIDIA_NAME.match(product.replace("-", " ", 1))
            assert match and match.group(1) == kind, f"{name}: node label {product} is not an {kind}"
        tolerated = [t for t in pod.get("tolerations", []) if t["key"] == "nvidia.com/gpu"]
        assert tolerated and tolerated[0]["operator"] == "Exists", f"{name}: tolerate the nvidia.com/gpu taint"


def test_every_container_runs_the_same_image_as_ray_container():
    images = set()
    for name, group in _groups(_manifest()):
        containers = group["template"]["spec"]["containers"]
        assert len(containers) == 1, f"{name}: KubeRay treats container 0 as the Ray container; keep it alone"
        container = containers[0]
        images.add(container["image"])
        # KubeRay replaces the command with `bash -c "... ray start ..."`; a command here would run before it.
        assert "command" not in container and "args" not in container, f"{name}: let KubeRay start Ray"
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][part]), f"{name}: {part} for cpu and memory"
    assert images == {"trtglm:latest"}, "one image everywhere: built from docker/Dockerfile (README)"


def test_work_volume_is_mounted_everywhere():
    for name, group in _groups(_manifest()):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/w"]
        assert len(mounts) == 1, f"{name}: mount the work volume at /w (the image's working directory)"
        assert not mounts[0].get("readOnly"), f"{name}: /w is written (out/<gpu>/model.engine)"
        volume = volumes[mounts[0]["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == PVC, f"{name}: /w is the shared PVC {PVC}"


def test_ray_start_params_obey_kuberay_validation():
    # KubeRay (validation.go) rejects resources set both in rayStartParams and in a group's top-level `resources`,
    # and rayStartParams['labels']; values are strings (map[string]string in the CRD).
    for name, group in _groups(_manifest()):
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values are strings"
        assert "labels" not in params, f"{name}: rayStartParams['labels'] is rejected by KubeRay"
        if {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
            assert not group.get("resources"), f"{name}: resources in both rayStartParams and the group's `resources`"


# ---- README -------------------------------------------------------------------------------------------------------

def test_readme_submit_command_matches_the_manifest():
    text = README.read_text().replace("\\\n", " ")  # shell continuation lines joined
    commands = re.findall(r"ray job submit [^\n]*", text)
    assert commands, "the README shows the `ray job submit` command"
    matrix = [c for c in commands if "trtglm build-matrix" in c]
    assert matrix, "the README submits a build-matrix job"
    for command in matrix:
        gpus = re.search(r"--gpus\s+([\w,]+)", command)
        assert gpus and set(gpus.group(1).split(",")) == GPU_KINDS, f"--gpus must list the worker groups: {command}"
        assert "/w/" in command, "paths on the shared volume"


def test_readme_says_whether_build_matrix_exists():
    # The README must not claim a command the CLI lacks (build-matrix arrives with issue 8), nor keep the caveat
    # once it is there.
    from trtglm.cli import main

    text = " ".join(README.read_text().split())
    caveat = "**not in the CLI yet**"
    if "build-matrix" in main.commands:
        assert caveat not in text, "build-matrix is in the CLI now: update docker/kuberay/README.md's status"
    else:
        assert caveat in text, "say in docker/kuberay/README.md's status that build-matrix is not in the CLI yet"
