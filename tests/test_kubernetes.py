"""deploy/kubernetes is a valid Kustomize base for the four services, checked offline.

- Rendering: a small renderer here reads kustomization.yaml (its `resources` and
  `images`, the only fields the base uses; any other field fails the test) and applies
  the image overrides. When `kubectl` is on the PATH (the python-svc machine image ships
  it, with kustomize built in; Debian 12 packages neither kubectl nor kustomize) its
  `kubectl kustomize` must render the same objects.
- Core resources: kubernetes-validate's schemas for Kubernetes 1.37 (its newest), strict:
  a field Kubernetes does not know is an error.
- KEDA's ScaledObject and TriggerAuthentication: the openAPIV3Schema of KEDA v2.20.2's
  CRDs (config/crd/bases/keda.sh_scaledobjects.yaml and keda.sh_triggerauthentications.yaml
  in the kedacore/keda repository, Apache-2.0), vendored as JSON under tests/data/keda with
  the descriptions removed. The API server prunes, or with kubectl's strict field
  validation refuses, fields a CRD schema does not declare; jsonschema allows them, so the
  test closes every object schema that lists properties (additionalProperties: false).
- What a user relies on: probe paths, container ports equal to the settings' defaults,
  the ScaledObject's queue equal to the jobs queue the topology code names, the
  processor's grace period longer than its drain, every env source present, every
  setting key known to the services.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings
from standardwebhooks import Webhook

from imgpipe.contracts.service import STOP_STEP_SECONDS
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.ingest.config import OutboxConfig
from imgpipe.notifier.config import NotifierConfig
from imgpipe.processor.adapters.cloudinary_storage import (
    CloudinaryConfigError,
    parse_cloudinary_url,
)
from imgpipe.processor.config import ProcessorConfig
from imgpipe.processor.jobs import JOBS_QUEUE
from imgpipe.status.config import ReadCacheConfig

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "deploy" / "kubernetes"
KEDA_SCHEMAS = Path(__file__).resolve().parent / "data" / "keda"
KUBERNETES_VERSION = "1.37.0"
SERVICES = ("ingest", "status", "notifier", "processor")
HTTP_FACING = ("ingest", "status", "notifier")
IMAGE_REGISTRY = "ghcr.io/imgpipe"
CONFIG_MAP = "imgpipe-config"
SECRET = "imgpipe-secrets"
# Peak resident memory from the README's "Benchmark" (MiB): ingest after the 10,000-row
# upload, the processor process after fanning out the 30,000-URL upload.
BENCHMARK_PEAK_MIB = {"ingest": 99, "processor": 196}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}

Manifest = dict[str, Any]


# Rendering -----------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def apply_images(doc: Manifest, images: list[dict[str, str]]) -> Manifest:
    """kustomize's `images:` override for the pod templates the base has (Deployments)."""
    doc = copy.deepcopy(doc)
    overrides = {image["name"]: image for image in images}
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
        if name in overrides:
            image = overrides[name]
            reference = image.get("newName", name)
            if "digest" in image:
                reference += "@" + image["digest"]
            elif "newTag" in image:
                reference += ":" + image["newTag"]
            container["image"] = reference
    return doc


def render_in_python() -> list[Manifest]:
    spec = kustomization()
    unsupported = set(spec) - {"apiVersion", "kind", "resources", "images"}
    assert not unsupported, f"the Python renderer does not apply {unsupported}"
    docs = []
    for resource in spec["resources"]:
        for doc in yaml.safe_load_all((BASE / resource).read_text()):
            if doc is not None:
                docs.append(apply_images(doc, spec.get("images", [])))
    return docs


def key(doc: Manifest) -> tuple[str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["name"]


@pytest.fixture(scope="module")
def rendered() -> list[Manifest]:
    return render_in_python()


@pytest.fixture(scope="module")
def objects(rendered: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    """(kind, name) -> the rendered object."""
    found: dict[tuple[str, str], Manifest] = {}
    for doc in rendered:
        assert (doc["kind"], doc["metadata"]["name"]) not in found, f"{key(doc)} twice"
        found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


def of_kind(rendered: list[Manifest], kind: str) -> list[Manifest]:
    return [doc for doc in rendered if doc["kind"] == kind]


def deployment(objects: dict[tuple[str, str], Manifest], service: str) -> Manifest:
    return objects["Deployment", f"imgpipe-{service}"]


def container(objects: dict[tuple[str, str], Manifest], service: str) -> Manifest:
    (only,) = deployment(objects, service)["spec"]["template"]["spec"]["containers"]
    return only


def test_every_file_in_the_directory_is_listed() -> None:
    listed = set(kustomization()["resources"])
    manifests = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == manifests
    others = {path.name for path in BASE.iterdir()} - manifests - {"kustomization.yaml"}
    assert others == {"README.md"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_same_objects(rendered: list[Manifest]) -> None:
    output = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, check=True
    ).stdout
    by_kubectl = {key(doc): doc for doc in yaml.safe_load_all(output) if doc}
    assert by_kubectl == {key(doc): doc for doc in rendered}


def test_the_four_services_are_there(objects: dict[tuple[str, str], Manifest]) -> None:
    for service in SERVICES:
        assert ("Deployment", f"imgpipe-{service}") in objects
        assert ("Service", f"imgpipe-{service}") in objects
        assert ("PodDisruptionBudget", f"imgpipe-{service}") in objects
    assert ("ConfigMap", CONFIG_MAP) in objects
    assert ("Secret", SECRET) in objects


def test_images_are_the_registry_placeholders(objects: dict[tuple[str, str], Manifest]) -> None:
    for service in SERVICES:
        assert container(objects, service)["image"] == f"{IMAGE_REGISTRY}/imgpipe-{service}:latest"


# Schemas -------------------------------------------------------------------------------


def test_core_resources_are_valid_kubernetes(rendered: list[Manifest]) -> None:
    core = [doc for doc in rendered if doc["kind"] not in KEDA_KINDS]
    assert len(core) == len(rendered) - 2
    for doc in core:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{key(doc)}: {error.message} at {list(error.path)}")


def test_strict_validation_catches_an_unknown_field(
    objects: dict[tuple[str, str], Manifest],
) -> None:
    broken = copy.deepcopy(objects["Deployment", "imgpipe-processor"])
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def closed(schema: Any) -> Any:
    """The schema with every object that lists properties closed to others, as the API
    server treats a structural CRD schema (x-kubernetes-preserve-unknown-fields aside)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {
        # The names under "properties" are field names, never schemas themselves.
        name: {field: closed(sub) for field, sub in value.items()}
        if name == "properties"
        else closed(value)
        for name, value in schema.items()
    }
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def keda_validator(kind: str) -> jsonschema.Draft7Validator:
    plural = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}
    schema = json.loads((KEDA_SCHEMAS / f"{plural[kind]}.keda.sh-v1alpha1.json").read_text())
    return jsonschema.Draft7Validator(closed(schema))


@pytest.mark.parametrize("kind", sorted(KEDA_KINDS))
def test_keda_resources_match_keda_s_crd_schema(rendered: list[Manifest], kind: str) -> None:
    (doc,) = of_kind(rendered, kind)
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    errors = [f"{list(e.path)}: {e.message}" for e in keda_validator(kind).iter_errors(doc)]
    assert not errors


def test_the_keda_schema_catches_a_misspelt_field(objects: dict[tuple[str, str], Manifest]) -> None:
    broken = copy.deepcopy(objects["ScaledObject", "imgpipe-processor"])
    broken["spec"]["maxReplicas"] = broken["spec"].pop("maxReplicaCount")
    assert list(keda_validator("ScaledObject").iter_errors(broken))
    del broken["spec"]["scaleTargetRef"]
    assert any(
        "scaleTargetRef" in e.message for e in keda_validator("ScaledObject").iter_errors(broken)
    )


# What a user relies on -----------------------------------------------------------------


def config_data(objects: dict[tuple[str, str], Manifest]) -> dict[str, str]:
    return objects["ConfigMap", CONFIG_MAP]["data"]


def secret_data(objects: dict[tuple[str, str], Manifest]) -> dict[str, str]:
    return objects["Secret", SECRET]["stringData"]


@pytest.mark.parametrize("service", SERVICES)
def test_probes_and_ports(objects: dict[tuple[str, str], Manifest], service: str) -> None:
    port = Settings.model_fields[f"{service}_port"].default
    spec = container(objects, service)
    assert spec["ports"] == [{"name": "http", "containerPort": port}]
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert spec["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service_spec = objects["Service", f"imgpipe-{service}"]["spec"]
    assert service_spec["ports"] == [{"name": "http", "port": port, "targetPort": "http"}]
    # No *_PORT in the settings moves the port away from the containers'.
    assert f"{service.upper()}_PORT" not in config_data(objects) | secret_data(objects)


@pytest.mark.parametrize("service", SERVICES)
def test_selectors_match_the_pods(objects: dict[tuple[str, str], Manifest], service: str) -> None:
    pods = deployment(objects, service)["spec"]["template"]["metadata"]["labels"]
    selector = deployment(objects, service)["spec"]["selector"]["matchLabels"]
    for selects in (
        selector,
        objects["Service", f"imgpipe-{service}"]["spec"]["selector"],
        objects["PodDisruptionBudget", f"imgpipe-{service}"]["spec"]["selector"]["matchLabels"],
    ):
        assert selects and selects.items() <= pods.items()


def test_the_scaled_object_watches_the_real_jobs_queue(
    objects: dict[tuple[str, str], Manifest],
) -> None:
    scaled = objects["ScaledObject", "imgpipe-processor"]["spec"]
    (trigger,) = scaled["triggers"]
    topology = Topology(namespace=config_data(objects)["IMGPIPE_NAMESPACE"])
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == topology.queue_name(JOBS_QUEUE)
    assert trigger["metadata"]["queueName"] == "imgpipe.processor.jobs"
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert float(trigger["metadata"]["value"]) > 0
    assert "host" not in trigger["metadata"]  # from the Secret, never in plain text
    assert scaled["scaleTargetRef"]["name"] == "imgpipe-processor"
    assert ("Deployment", scaled["scaleTargetRef"]["name"]) in objects
    assert 1 == scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    auth = objects["TriggerAuthentication", trigger["authenticationRef"]["name"]]["spec"]
    assert auth["secretTargetRef"] == [{"parameter": "host", "name": SECRET, "key": "AMQP_URL"}]
    assert "AMQP_URL" in secret_data(objects)
    assert "replicas" not in deployment(objects, "processor")["spec"]


def test_the_processor_s_grace_period_outlasts_its_drain(
    objects: dict[tuple[str, str], Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in config_data(objects).items():
        monkeypatch.setenv(name, value)
    drain = ProcessorConfig().shutdown_grace
    assert drain == float(config_data(objects)["IMGPIPE_PROCESSOR_SHUTDOWN_GRACE"])
    grace = deployment(objects, "processor")["spec"]["template"]["spec"]
    # The drain, then at least one bounded stop step (broker, pool, clients).
    assert grace["terminationGracePeriodSeconds"] > drain + STOP_STEP_SECONDS


@pytest.mark.parametrize("service", HTTP_FACING)
def test_http_services_scale_on_cpu(objects: dict[tuple[str, str], Manifest], service: str) -> None:
    hpa = objects["HorizontalPodAutoscaler", f"imgpipe-{service}"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        f"imgpipe-{service}",
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment(objects, service)["spec"]
    # HPA's utilisation is a share of the request: every container must ask for CPU.
    assert container(objects, service)["resources"]["requests"]["cpu"]


def test_only_keda_scales_the_processor(objects: dict[tuple[str, str], Manifest]) -> None:
    assert ("HorizontalPodAutoscaler", "imgpipe-processor") not in objects


def test_every_env_source_exists(objects: dict[tuple[str, str], Manifest]) -> None:
    maps = {name: doc["data"] for (kind, name), doc in objects.items() if kind == "ConfigMap"}
    secrets = {name: doc["stringData"] for (kind, name), doc in objects.items() if kind == "Secret"}
    for service in SERVICES:
        spec = container(objects, service)
        sources = {
            ("ConfigMap", s["configMapRef"]["name"])
            if "configMapRef" in s
            else ("Secret", s["secretRef"]["name"])
            for s in spec["envFrom"]
        }
        assert {("ConfigMap", CONFIG_MAP), ("Secret", SECRET)} <= sources
        for source in spec["envFrom"]:
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in maps
            else:
                assert source["secretRef"]["name"] in secrets
        for variable in spec.get("env", []):
            origin = variable.get("valueFrom")
            if origin is None:
                continue
            if "configMapKeyRef" in origin:
                ref = origin["configMapKeyRef"]
                assert ref["key"] in maps[ref["name"]]
            elif "secretKeyRef" in origin:
                ref = origin["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]]
            else:
                assert origin["resourceFieldRef"]["containerName"] == spec["name"]


def known_variables() -> set[str]:
    """Every environment variable a service reads: aliases, else prefix + field name."""
    names = set()
    models: list[type[BaseSettings]] = [
        Settings,
        ProcessorConfig,
        OutboxConfig,
        ReadCacheConfig,
        NotifierConfig,
    ]
    for model in models:
        prefix = model.model_config.get("env_prefix") or ""
        for field_name, field in model.model_fields.items():
            names.add((field.alias or prefix + field_name).upper())
    return names


def test_every_setting_is_one_the_services_read(objects: dict[tuple[str, str], Manifest]) -> None:
    known = known_variables()
    for name in config_data(objects) | secret_data(objects):
        assert name in known, f"{name} is read by no service"
    for service in SERVICES:
        for variable in container(objects, service).get("env", []):
            assert variable["name"] in known


def test_the_settings_load_and_demand_shared_storage(
    objects: dict[tuple[str, str], Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (config_data(objects) | secret_data(objects)).items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.require_shared_storage is True
    assert settings.host == "0.0.0.0"
    assert str(settings.data_dir) == "/data"
    assert settings.cloudinary_url and settings.webhook_secret


def test_the_secret_is_a_marked_template(objects: dict[tuple[str, str], Manifest]) -> None:
    text = (BASE / "secret.yaml").read_text()
    assert "TEMPLATE" in text and "PLACEHOLDER" in text
    for name, value in secret_data(objects).items():
        assert "REPLACE_ME" in value, name
    # A forgotten placeholder stops the service that needs it at start-up.
    with pytest.raises(CloudinaryConfigError):
        parse_cloudinary_url(secret_data(objects)["CLOUDINARY_URL"], "imgpipe")
    with pytest.raises(Exception, match="base64"):
        Webhook(secret_data(objects)["WEBHOOK_SECRET"])


def cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize("service", SERVICES)
def test_resources_are_requested_and_limited(
    objects: dict[tuple[str, str], Manifest], service: str
) -> None:
    resources = container(objects, service)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert cpu(requests["cpu"]) <= cpu(limits["cpu"])
    assert mebibytes(requests["memory"]) <= mebibytes(limits["memory"])
    if service in BENCHMARK_PEAK_MIB:
        assert mebibytes(requests["memory"]) > BENCHMARK_PEAK_MIB[service]


def test_the_processor_runs_one_worker_per_cpu_of_its_limit(
    objects: dict[tuple[str, str], Manifest],
) -> None:
    spec = container(objects, "processor")
    (workers,) = [v for v in spec["env"] if v["name"] == "IMGPIPE_WORKERS"]
    ref = workers["valueFrom"]["resourceFieldRef"]
    assert (ref["resource"], ref["divisor"]) == ("limits.cpu", "1")
    assert math.ceil(cpu(spec["resources"]["limits"]["cpu"])) >= 1


@pytest.mark.parametrize("service", SERVICES)
def test_pods_run_locked_down(objects: dict[tuple[str, str], Manifest], service: str) -> None:
    pod = deployment(objects, service)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    context = container(objects, service)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    volumes = {volume["name"] for volume in pod.get("volumes", [])}
    mounts = container(objects, service).get("volumeMounts", [])
    assert {mount["name"] for mount in mounts} <= volumes
    assert "/tmp" in {mount["mountPath"] for mount in mounts}
