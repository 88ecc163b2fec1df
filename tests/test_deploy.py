"""The Kubernetes manifests of ``deploy/``: valid against the Kubernetes JSON schemas (offline,
with the schemas bundled in ``kubernetes-validate``), and consistent with the server they run:
ports and probes match the effective ``ServerConfig`` (image ENV + ConfigMap TOML + container
env + args, through camserve's own loader and parser), the grace period covers the drain, the
Services, PDB and HPA point at the Deployment. Each check is also shown to fail on a broken copy.
"""

from __future__ import annotations

import copy
import re
import tomllib
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from test_dockerfile import env_of_image, instructions

from camserve.cli import build_parser
from camserve.client import Client
from camserve.serving import config as server_config
from camserve.serving.server import SERVICE_NAME

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
#: Oldest Kubernetes with native gRPC probes on by default (GA in 1.27), and the newest schemas.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
ALT_BEGIN, ALT_END = "# BEGIN queue-depth alternative", "# END queue-depth alternative"

Manifest = dict[str, Any]


# ---------------------------------------------------------------------------- loading


def kustomize_resources() -> list[str]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]


def manifests() -> list[tuple[str, Manifest]]:
    """(file, document) for every document of every file that kustomization.yaml lists."""
    return [(f, d) for f in kustomize_resources() for d in yaml.safe_load_all((DEPLOY / f).read_text()) if d]


def one(kind: str, name: str | None = None) -> Manifest:
    found = [d for _, d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/, found {len(found)}"
    return copy.deepcopy(found[0])


def container(deployment: Manifest) -> Manifest:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "camserve"]
    return c


def effective_config(deployment: Manifest, configmap: Manifest, tmp: Path) -> server_config.ServerConfig:
    """What ``camserve serve`` in the pod would run with: the image's ENV, the container's env
    and args, the ConfigMap's file where CAMSERVE_CONFIG points (written under ``tmp``)."""
    c = container(deployment)
    env = {**env_of_image(), **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}}
    if "CAMSERVE_CONFIG" in env:
        env["CAMSERVE_CONFIG"] = str(materialize(env["CAMSERVE_CONFIG"], deployment, configmap, tmp))
    args = build_parser().parse_args(c.get("args", []))
    assert args.command == "serve", f"the container must run `camserve serve`, runs {c.get('args')}"
    return server_config.from_args(args, env=env)


def materialize(path: str, deployment: Manifest, configmap: Manifest, tmp: Path) -> Path:
    """The local copy of the file ``path`` of the pod, which must come from ``configmap``."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    for mount in container(deployment).get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap", {})
        key = path.removeprefix(mount["mountPath"].rstrip("/") + "/")
        if source.get("name") == configmap["metadata"]["name"] and key in configmap["data"]:
            out = tmp / key
            out.write_text(configmap["data"][key])
            return out
    raise AssertionError(f"{path} is not a key of ConfigMap {configmap['metadata']['name']} mounted in the container")


# ---------------------------------------------------------------------------- checks
# Each returns a list of problems (empty: consistent), so tests can show them failing.


def probe_problems(deployment: Manifest, cfg: server_config.ServerConfig) -> list[str]:
    c, problems = container(deployment), []
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if ports.get("grpc") != cfg.port:
        problems.append(f"container port 'grpc' is {ports.get('grpc')}, the server listens on {cfg.port}")
    if ports.get("metrics") != cfg.metrics_port:
        problems.append(f"container port 'metrics' is {ports.get('metrics')}, metrics are on {cfg.metrics_port}")
    if cfg.http_port >= 0 and ports.get("http") != cfg.http_port:
        problems.append(f"container port 'http' is {ports.get('http')}, the HTTP API is on {cfg.http_port}")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    scrape = (annotations.get("prometheus.io/scrape"), annotations.get("prometheus.io/port"))
    if scrape != ("true", str(cfg.metrics_port)):
        problems.append(f"pod annotations must say prometheus.io/scrape 'true', port '{cfg.metrics_port}'")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        g = c.get(kind, {}).get("grpc")
        if g is None:
            problems.append(f"{kind} must be a native gRPC probe on the grpc.health.v1 service")
            continue
        if g["port"] != cfg.port:
            problems.append(f"{kind} probes port {g['port']}, the server listens on {cfg.port}")
        if g.get("service", "") not in ("", SERVICE_NAME):
            problems.append(
                f"{kind} asks for health service {g['service']!r}; the server registers '' and {SERVICE_NAME!r}"
            )
    if not problems and c["readinessProbe"]["grpc"].get("service", "") != "":
        problems.append("readinessProbe must ask for the overall service ''")
    return problems


def termination_problems(deployment: Manifest, cfg: server_config.ServerConfig, margin_s: float = 5.0) -> list[str]:
    spec = deployment["spec"]["template"]["spec"]
    pre_stop = container(deployment).get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    sleep_s = float(command[1]) if command[:1] == ["sleep"] else float(pre_stop.get("sleep", {}).get("seconds", 0))
    need = sleep_s + cfg.drain_timeout_s + margin_s
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < need:
        return [
            f"terminationGracePeriodSeconds {grace} < preStop {sleep_s} s + drain_timeout_s {cfg.drain_timeout_s} s"
            f" + {margin_s} s margin"
        ]
    return []


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def service_problems(service: Manifest, deployment: Manifest, cfg: server_config.ServerConfig) -> list[str]:
    labels, problems = deployment["spec"]["template"]["metadata"]["labels"], []
    if not service["spec"].get("selector") or not selects(service["spec"]["selector"], labels):
        problems.append(
            f"Service {service['metadata']['name']} selector {service['spec'].get('selector')} "
            f"does not select the pod labels {labels}"
        )
    names = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    for p in service["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        if (names.get(target) if isinstance(target, str) else target) not in names.values():
            problems.append(f"Service port {p['name']} targets {target!r}, not a container port ({names})")
    return problems


def hpa_problems(hpa: Manifest, deployment: Manifest) -> list[str]:
    ref, problems = hpa["spec"]["scaleTargetRef"], []
    want = {"apiVersion": deployment["apiVersion"], "kind": deployment["kind"], "name": deployment["metadata"]["name"]}
    if {k: ref.get(k) for k in want} != want:
        problems.append(f"HPA scaleTargetRef {ref} is not the Deployment {want}")
    requests = container(deployment)["resources"].get("requests", {})
    for m in hpa["spec"]["metrics"]:
        utilisation = m["type"] == "Resource" and m["resource"]["target"]["type"] == "Utilization"
        if utilisation and m["resource"]["name"] not in requests:
            problems.append(f"HPA scales on {m['resource']['name']} utilisation but the container requests none")
    if hpa["spec"].get("minReplicas", 1) < 2:
        problems.append("minReplicas < 2: losing one pod would lose the service")
    return problems


def configmap_problems(configmap: Manifest, deployment: Manifest) -> list[str]:
    """TOML keys the environment overrides (they would be silently ignored)."""
    c = container(deployment)
    env = {**env_of_image(), **{e["name"]: e.get("value") for e in c.get("env", [])}}
    problems = []
    for key, text in configmap["data"].items():
        data = tomllib.loads(text)
        for k in data.get("serve", data):
            name = f"{server_config.ENV_PREFIX}{k.upper()}"
            if name in env:
                problems.append(f"{key}: {k!r} is overridden by the environment variable {name}={env[name]!r}")
    return problems


def uncomment_block(text: str, begin: str, end: str) -> str:
    """``text`` with the commented lines between the ``begin`` and ``end`` marker lines made live."""
    out, inside = [], False
    for line in text.splitlines():
        if line.strip() in (begin, end):
            inside = line.strip() == begin
            continue
        out.append(re.sub(r"^(\s*)# ?", r"\1", line) if inside else line)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture()
def deployment() -> Manifest:
    return one("Deployment", "camserve")


@pytest.fixture()
def configmap() -> Manifest:
    return one("ConfigMap", "camserve-config")


@pytest.fixture()
def cfg(deployment: Manifest, configmap: Manifest, tmp_path: Path) -> server_config.ServerConfig:
    return effective_config(deployment, configmap, tmp_path)


# ---------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    docs = manifests()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for _f, d in docs:
        kubernetes_validate.validate(d, version, strict=True)  # raises naming the bad field


def test_the_validator_rejects_broken_manifests(deployment: Manifest) -> None:
    c = container(deployment)
    c["readynessProbe"] = c.pop("readinessProbe")  # a typo: strict schemas refuse unknown fields
    with pytest.raises(kubernetes_validate.ValidationError, match="readynessProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    broken = one("Deployment", "camserve")
    container(broken)["livenessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take numbers only
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type 'integer'"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    service = one("Service", "camserve-headless")
    del service["spec"]["ports"][0]["port"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'port' is a required property"):
        kubernetes_validate.validate(service, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_commented_queue_depth_hpa_is_valid_too(version: str) -> None:
    text = (DEPLOY / "hpa.yaml").read_text()
    assert ALT_BEGIN in text and ALT_END in text
    hpa = yaml.safe_load(uncomment_block(text, ALT_BEGIN, ALT_END))
    kubernetes_validate.validate(hpa, version, strict=True)
    (pods,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods["pods"]["metric"]["name"] == "camserve_queue_depth"
    assert "camserve_queue_depth" in (DEPLOY / "README.md").read_text()  # the adapter rule is documented


def test_kustomization_lists_every_manifest_file() -> None:
    listed = kustomize_resources()
    # rayjob.yaml (camserve bulk, KubeRay CRDs) is applied on its own: tests/bulk/test_bulk_rayjob.py
    present = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name not in ("kustomization.yaml", "rayjob.yaml"))
    assert sorted(listed) == present


# ---------------------------------------------------------------------------- consistency


def test_ports_and_probes_match_the_server(deployment: Manifest, cfg: server_config.ServerConfig) -> None:
    assert cfg.port == server_config.ServerConfig().port == 8500
    assert probe_problems(deployment, cfg) == []
    probes = {k: container(deployment)[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    # Liveness must not count during warm-up: the startup probe gives it minutes first.
    assert probes["startupProbe"]["periodSeconds"] * probes["startupProbe"]["failureThreshold"] >= 300


def test_probe_problems_are_found(deployment: Manifest, cfg: server_config.ServerConfig) -> None:
    container(deployment)["readinessProbe"]["grpc"]["port"] = 9000
    container(deployment)["livenessProbe"] = {"tcpSocket": {"port": 8500}}
    problems = probe_problems(deployment, cfg)
    assert len(problems) == 2 and "readinessProbe probes port 9000" in problems[0] and "livenessProbe" in problems[1]
    moved = server_config.ServerConfig(port=9000)
    assert any("container port 'grpc' is 8500" in p for p in probe_problems(one("Deployment"), moved))
    http_moved = server_config.ServerConfig(http_port=9090)
    assert any("container port 'http' is 8080" in p for p in probe_problems(one("Deployment"), http_moved))


def test_configmap_toml_loads_into_a_valid_config(configmap: Manifest, cfg: server_config.ServerConfig) -> None:
    text = configmap["data"]["camserve.toml"]
    for key, value in tomllib.loads(text).items():
        assert getattr(cfg, key) == value, f"{key} from the ConfigMap did not reach the server's config"
    assert cfg.models == "/models" and cfg.host == "0.0.0.0"  # from the image


def test_configmap_problems_are_found(deployment: Manifest, configmap: Manifest, tmp_path: Path) -> None:
    assert configmap_problems(configmap, deployment) == []
    configmap["data"]["camserve.toml"] += "port = 9000\n"  # the image's CAMSERVE_PORT would win
    assert configmap_problems(configmap, deployment) == [
        "camserve.toml: 'port' is overridden by the environment variable CAMSERVE_PORT='8500'"
    ]
    configmap["data"]["camserve.toml"] += "max_batch_sise = 8\n"  # a typo stops the server
    with pytest.raises(ValueError, match="unknown setting 'max_batch_sise'"):
        effective_config(deployment, configmap, tmp_path)


def test_grace_period_covers_prestop_and_drain(deployment: Manifest, cfg: server_config.ServerConfig) -> None:
    assert termination_problems(deployment, cfg) == []
    longer = server_config.ServerConfig(drain_timeout_s=60.0)
    (problem,) = termination_problems(deployment, longer)
    assert "terminationGracePeriodSeconds 45 < preStop 5.0 s + drain_timeout_s 60.0 s" in problem


def test_services_select_the_pods(deployment: Manifest, cfg: server_config.ServerConfig) -> None:
    headless = one("Service", "camserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in headless["spec"]["ports"]] == [cfg.port]  # dns:///camserve-headless...:8500
    assert [p["port"] for p in one("Service", "camserve-http")["spec"]["ports"]] == [cfg.http_port] == [8080]
    for service in (headless, one("Service", "camserve-metrics"), one("Service", "camserve-http")):
        assert service_problems(service, deployment, cfg) == []
    pdb = one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert deployment["spec"]["selector"]["matchLabels"] == pdb["spec"]["selector"]["matchLabels"]


def test_service_problems_are_found(deployment: Manifest, cfg: server_config.ServerConfig) -> None:
    headless = one("Service", "camserve-headless")
    headless["spec"]["selector"]["app.kubernetes.io/name"] = "other"
    headless["spec"]["ports"][0]["targetPort"] = "grcp"
    assert len(service_problems(headless, deployment, cfg)) == 2


def test_hpa_targets_the_deployment(deployment: Manifest) -> None:
    hpa = one("HorizontalPodAutoscaler")
    assert hpa_problems(hpa, deployment) == []
    hpa["spec"]["scaleTargetRef"]["name"] = "camserv"
    del container(deployment)["resources"]["requests"]["cpu"]
    assert len(hpa_problems(hpa, deployment)) == 2


def test_pod_runs_the_image_as_its_user_on_one_gpu(deployment: Manifest) -> None:
    spec, c = deployment["spec"]["template"]["spec"], container(deployment)
    users = [args for word, args in instructions() if word == "USER"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert [str(spec["securityContext"]["runAsUser"])] == users[-1:]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # TF and Keras still need scratch space
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert c["image"] == f"camserve:{version}"


# ---------------------------------------------------------------------------- the client's dns:/// target


def test_client_accepts_the_readmes_dns_target() -> None:
    """``Client("dns:///<host>:<port>")``, as deploy/README.md tells, reaches a health service."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"dns:///localhost:{port}", timeout=10.0) as c:
            assert c.health("") == "SERVING"
    finally:
        server.stop(0)
    assert "dns:///camserve-headless.default.svc.cluster.local:8500" in (DEPLOY / "README.md").read_text()


ACCELERATOR_KEYS = ("precision", "xla", "device", "gpu_memory_growth", "intra_op_threads", "inter_op_threads")


def accelerator_problems(configmap: Manifest, deployment: Manifest, tmp: Path) -> list[str]:
    """The accelerator settings must be in the ConfigMap (where operators change them) and
    reach the server's config with valid values."""
    data = tomllib.loads(configmap["data"]["camserve.toml"])
    problems = [f"camserve.toml has no {k!r} (accelerator settings)" for k in ACCELERATOR_KEYS if k not in data]
    try:
        cfg = effective_config(deployment, configmap, tmp)
    except ValueError as exc:
        return problems + [f"the server refuses the settings: {exc}"]
    problems += [
        f"{k} = {data[k]!r} did not reach the server"
        for k in data
        if k in ACCELERATOR_KEYS and getattr(cfg, k) != data[k]
    ]
    return problems


def test_accelerator_settings_are_wired(deployment: Manifest, configmap: Manifest, tmp_path: Path) -> None:
    assert accelerator_problems(configmap, deployment, tmp_path) == []
    cfg = effective_config(deployment, configmap, tmp_path)
    assert (cfg.precision, cfg.xla, cfg.device, cfg.gpu_memory_growth) == ("float32", False, "auto", True)
    half = copy.deepcopy(configmap)
    half["data"]["camserve.toml"] = (
        half["data"]["camserve.toml"]
        .replace('precision = "float32"', 'precision = "mixed_float16"')
        .replace("xla = false", "xla = true")
    )
    assert effective_config(deployment, half, tmp_path).precision == "mixed_float16"
    assert effective_config(deployment, half, tmp_path).xla is True


def test_accelerator_problems_are_found(deployment: Manifest, configmap: Manifest, tmp_path: Path) -> None:
    missing = copy.deepcopy(configmap)
    missing["data"]["camserve.toml"] = re.sub(r"(?m)^\s*xla = .*$", "", missing["data"]["camserve.toml"])
    assert accelerator_problems(missing, deployment, tmp_path) == ["camserve.toml has no 'xla' (accelerator settings)"]
    bad = copy.deepcopy(configmap)
    bad["data"]["camserve.toml"] = bad["data"]["camserve.toml"].replace('precision = "float32"', 'precision = "half"')
    (problem,) = accelerator_problems(bad, deployment, tmp_path)
    assert "unknown precision 'half'" in problem
    shadowed = copy.deepcopy(deployment)
    container(shadowed)["env"].append({"name": "CAMSERVE_XLA", "value": "true"})
    assert configmap_problems(configmap, shadowed) == [
        "camserve.toml: 'xla' is overridden by the environment variable CAMSERVE_XLA='true'"
    ]
