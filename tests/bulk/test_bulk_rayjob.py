"""deploy/rayjob.yaml, offline: valid against the vendored RayJob schema (kubernetes-validate has
no CRD schemas), its pod templates valid core/v1 PodTemplates for the Kubernetes schemas, and its
entrypoint a `camserve bulk` command line that camserve's own parser accepts, on GPU workers
that match the actor pool. Each check is also shown to fail on a broken copy."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from camserve.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "rayjob.yaml"
SCHEMA = REPO / "deploy" / "schemas" / "rayjob-ray.io-v1.json"


@pytest.fixture()
def rayjob() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return doc


def schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def pod_templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = doc["spec"]["rayClusterSpec"]
    found = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        found[group["groupName"]] = group["template"]
    if "submitterPodTemplate" in doc["spec"]:
        found["submitter"] = doc["spec"]["submitterPodTemplate"]
    return found


def validate_pod_template(template: dict[str, Any]) -> None:
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    kubernetes_validate.validate(wrapped, kubernetes_validate.latest_version(), strict=True)


def bulk_args(doc: dict[str, Any]):
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "camserve", f"the entrypoint must run camserve, runs {argv[0]}"
    return build_parser().parse_args(argv[1:])


def test_the_schema_is_valid_and_the_manifest_follows_it(rayjob: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA.read_text()))
    assert schema_errors(rayjob) == []


def test_the_schema_rejects_broken_manifests(rayjob: dict[str, Any]) -> None:
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["workerGroupSpec"] = broken["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e and "unexpected" in e for e in schema_errors(broken))
    broken = copy.deepcopy(rayjob)
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in schema_errors(broken))
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("is not of type 'string'" in e for e in schema_errors(broken))
    broken = copy.deepcopy(rayjob)
    broken["spec"]["submissionMode"] = "K8sJob"
    assert any("submissionMode" in e for e in schema_errors(broken))


def test_pod_templates_are_valid_kubernetes(rayjob: dict[str, Any]) -> None:
    templates = pod_templates(rayjob)
    assert set(templates) >= {"head", "gpu"}
    for template in templates.values():
        validate_pod_template(template)
    broken = copy.deepcopy(templates["gpu"])
    broken["spec"]["containers"][0]["resouces"] = broken["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resouces"):
        validate_pod_template(broken)


def test_the_entrypoint_is_camserve_bulk_on_the_image_models(rayjob: dict[str, Any]) -> None:
    args = bulk_args(rayjob)
    assert args.command == "bulk"
    model = str(args.model)
    assert model.startswith("/models/")  # the Dockerfile copies models/ to /models
    assert (REPO / "models" / model.removeprefix("/models/") / "config.toml").is_file()
    broken = copy.deepcopy(rayjob)
    broken["spec"]["entrypoint"] += " --top-k 2 --target cat"  # exclusive options
    with pytest.raises(SystemExit):
        bulk_args(broken)


def test_one_gpu_actor_per_gpu_worker_and_no_actors_on_the_head(rayjob: dict[str, Any]) -> None:
    args = bulk_args(rayjob)
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args.gpus_per_actor == 1  # GPU actors even before the autoscaler has added a GPU worker
    assert args.max_actors == gpu["maxReplicas"] >= gpu["minReplicas"] >= 1
    images = {c["image"] for t in pod_templates(rayjob).values() for c in t["spec"]["containers"]}
    assert len(images) == 1, f"head and workers must run the same image (camserve and Ray versions): {images}"


def test_the_documented_image_build_matches_the_manifest(rayjob: dict[str, Any]) -> None:
    """deploy/README.md builds the image the pods run: the Dockerfile with the bulk extra, then
    Ray's dashboard at the manifest's rayVersion."""
    import re

    readme = (REPO / "deploy" / "README.md").read_text()
    (base_tag,) = re.findall(r"docker build --build-arg CAMSERVE_EXTRAS=bulk -t (\S+) \.", readme)
    (image_tag,) = re.findall(r"docker build -t (\S+) - <<'DOCKERFILE'\n\s*FROM (\S+)", readme)
    assert image_tag[1] == base_tag
    (pinned,) = re.findall(r'"ray\[default\]==([0-9.]+)"', readme)
    assert pinned == rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    images = {c["image"] for t in pod_templates(rayjob).values() for c in t["spec"]["containers"]}
    assert images == {image_tag[0]}
