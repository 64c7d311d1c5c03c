"""Deployment manifests (deploy/knative): valid Kubernetes objects, and consistent with the code
and with the compose files. Offline: the schemas ship in the kubernetes-validate package."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from moderation.cli import main as cli
from shared.config import Settings

ROOT = Path(__file__).resolve().parents[2]
KNATIVE = ROOT / "deploy" / "knative"
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "compose.offline.yml"]
# The CronJob alternative to relay.yaml: valid, but deliberately not in the kustomization.
UNLISTED = {"relay-cronjob.yaml"}
IMAGE = "ad-moderation"
FUNCTIONS = {"predict", "async_predict", "get_result", "moderation_consumer"}
# The oldest Kubernetes the manifests are meant for, and the newest the package ships.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
CORE_KINDS = {"ConfigMap", "Secret", "Deployment", "Job", "CronJob"}
KNATIVE_REVISION_FIELDS = ("containerConcurrency", "timeoutSeconds")
FRAMEWORK_VARIABLES = {"FUNCTION_TARGET", "FUNCTION_SOURCE", "PORT", "WORKERS", "HOST"}
# Variables of the images that compose runs besides the project's (PostgreSQL, the brokers).
COMPOSE_IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
COMPOSE_IMAGE_VARIABLES |= {"KAFKA_BROKERS", "ADVERTISED_LISTENER"}
# Grafana's own (the observability profile).
COMPOSE_IMAGE_VARIABLES |= {"GF_AUTH_ANONYMOUS_ENABLED", "GF_AUTH_ANONYMOUS_ORG_ROLE"}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object in deploy/knative but the kustomization."""
    return [
        (path.name, document)
        for path in sorted(KNATIVE.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def objects(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in manifests() if document["kind"] == kind]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(file:object, pod spec) of every object that runs pods (Knative Services included)."""
    for file, document in manifests():
        spec = document.get("spec", {})
        if document["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            yield f"{file}:{document['metadata']['name']}", spec["template"]["spec"]


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for where, pod_spec in pod_specs():
        for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
            yield f"{where}:{container['name']}", container


def compose_services() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in COMPOSE_FILES:
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            yield f"{path.name}:{name}", service


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):  # the KEY=value form
        environment = dict(item.partition("=")[::2] for item in environment)
    return {name: str(value) for name, value in environment.items()}


def knative_variables() -> Iterator[tuple[str, str]]:
    """(where, variable name) for every variable the manifests set."""
    for file, document in manifests():
        where = f"{file}:{document['metadata']['name']}"
        for section in ("data", "stringData"):
            for name in document.get(section) or {}:
                yield where, name
    for where, container in containers():
        for variable in container.get("env", []):
            yield where, variable["name"]


def function_targets() -> Iterator[tuple[str, str]]:
    for where, container in containers():
        for variable in container.get("env", []):
            if variable["name"] == "FUNCTION_TARGET":
                yield where, variable["value"]
    for where, service in compose_services():
        if target := compose_environment(service).get("FUNCTION_TARGET"):
            yield where, target


def commands() -> Iterator[tuple[str, list[str]]]:
    """Every container command line (Kubernetes command + args, compose command)."""
    for where, container in containers():
        yield where, container.get("command", []) + container.get("args", [])
    for where, service in compose_services():
        command = service.get("command", [])
        yield where, command.split() if isinstance(command, str) else command


def is_known_variable(name: str) -> bool:
    return (
        name.lower() in Settings.model_fields
        or name in FRAMEWORK_VARIABLES
        or re.fullmatch(r"KAFKA_[A-Z0-9_]+", name) is not None  # librdkafka properties
    )


def schema_problem(document: dict[str, Any], version: str) -> str | None:
    """None if the object is valid for that Kubernetes version (no unknown fields), else why."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path)
        return f"{document['kind']} {document['metadata'].get('name')}: {error.message} at {where}"
    return None


def setting_default(field: str) -> Any:
    return Settings.model_fields[field].default


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(version: str) -> None:
    core = [(file, doc) for file, doc in manifests() if doc["kind"] in CORE_KINDS]
    assert {doc["kind"] for _, doc in core} == CORE_KINDS
    problems = [(file, schema_problem(document, version)) for file, document in core]
    assert [(file, problem) for file, problem in problems if problem] == []


def test_schema_validation_rejects_an_unknown_field() -> None:
    (config_map,) = objects("ConfigMap")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**config_map, "dta": {}}, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_knative_service_pod_templates_validate_as_core_pods(version: str) -> None:
    services = objects("Service")
    # Kubernetes names cannot hold underscores: the Services use dashes.
    assert {s["metadata"]["name"] for s in services} == {f.replace("_", "-") for f in FUNCTIONS}
    for service in services:
        assert service["apiVersion"] == "serving.knative.dev/v1"
        template = service["spec"]["template"]
        spec = dict(template["spec"])
        for field in KNATIVE_REVISION_FIELDS:
            value = spec.pop(field)
            assert type(value) is int and value > 0, (service["metadata"]["name"], field)
        metadata = {"name": service["metadata"]["name"], **template["metadata"]}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
        assert schema_problem(pod, version) is None


def test_kafka_sources_are_complete_and_dead_letter_to_the_kafka_sink() -> None:
    sinks = {sink["metadata"]["name"]: sink for sink in objects("KafkaSink")}
    services = {service["metadata"]["name"] for service in objects("Service")}
    for sink in sinks.values():
        assert sink["apiVersion"] == "eventing.knative.dev/v1alpha1"
        known = {"topic", "bootstrapServers", "contentMode", "auth"}
        assert set(sink["spec"]) <= known | {"numPartitions", "replicationFactor"}
        assert isinstance(sink["spec"]["topic"], str)
        assert sink["spec"]["bootstrapServers"]
    sources = objects("KafkaSource")
    assert len(sources) == 2
    for source in sources:
        assert source["apiVersion"] == "sources.knative.dev/v1beta1"
        spec = source["spec"]
        known = {"bootstrapServers", "topics", "consumerGroup", "initialOffset", "ordering"}
        assert set(spec) <= known | {"delivery", "sink", "consumers", "net"}
        assert all(isinstance(server, str) for server in spec["bootstrapServers"])
        assert spec["topics"] and all(isinstance(topic, str) for topic in spec["topics"])
        assert isinstance(spec["consumerGroup"], str)
        assert spec.get("initialOffset", "latest") in {"earliest", "latest"}
        assert spec["ordering"] == "ordered"
        sink = spec["sink"]["ref"]
        assert (sink["apiVersion"], sink["kind"]) == ("serving.knative.dev/v1", "Service")
        assert sink["name"] == "moderation-consumer" and sink["name"] in services
        delivery = spec["delivery"]
        assert type(delivery["retry"]) is int and delivery["retry"] >= 0
        assert delivery["backoffPolicy"] in {"linear", "exponential"}
        assert re.fullmatch(r"PT\d+(\.\d+)?S", delivery["backoffDelay"])
        dead_letters = delivery["deadLetterSink"]["ref"]
        assert dead_letters["apiVersion"] == "eventing.knative.dev/v1alpha1"
        assert dead_letters["kind"] == "KafkaSink" and dead_letters["name"] in sinks


def test_kafka_topics_are_the_settings_defaults() -> None:
    groups = {src["spec"]["consumerGroup"]: src["spec"]["topics"] for src in objects("KafkaSource")}
    assert groups == {
        "moderation-consumer": [setting_default("moderation_topic")],
        "moderation-consumer-retry": [setting_default("retry_topic")],
    }
    assert [sink["spec"]["topic"] for sink in objects("KafkaSink")] == [
        setting_default("dlq_topic")
    ]


def test_kafka_brokers_are_the_config_map_brokers() -> None:
    (config_map,) = objects("ConfigMap")
    brokers = config_map["data"]["KAFKA_BOOTSTRAP_SERVERS"].split(",")
    for document in objects("KafkaSource") + objects("KafkaSink"):
        assert document["spec"]["bootstrapServers"] == brokers, document["metadata"]["name"]


def test_function_targets_name_functions_in_the_code() -> None:
    targets = list(function_targets())
    assert {target for _, target in targets} == FUNCTIONS
    for where, target in targets:
        source = ROOT / "functions" / target / "main.py"
        assert source.is_file(), f"{where}: no {source.relative_to(ROOT)}"
        defined = {
            node.name
            for node in ast.parse(source.read_text()).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert target in defined, f"{where}: {target} is not defined in its main.py"


def test_moderation_commands_exist_in_the_cli() -> None:
    used = [(where, line) for where, line in commands() if line[:1] == ["moderation"]]
    assert {line[1] for _, line in used} >= {"migrate", "topics", "relay", "dlq-recorder"}
    for where, line in used:
        assert line[1] in cli.commands, f"{where}: no command `moderation {line[1]}`"


def test_environment_variables_are_known_settings() -> None:
    unknown = [(where, name) for where, name in knative_variables() if not is_known_variable(name)]
    for where, service in compose_services():
        for name in compose_environment(service):
            if not is_known_variable(name) and name not in COMPOSE_IMAGE_VARIABLES:
                unknown.append((where, name))
    assert unknown == []


def test_env_from_names_objects_in_the_manifests() -> None:
    kinds = {"configMapRef": "ConfigMap", "secretRef": "Secret"}
    for where, container in containers():
        for source in container["envFrom"]:
            ((field, ref),) = source.items()
            names = {document["metadata"]["name"] for document in objects(kinds[field])}
            assert ref["name"] in names, f"{where}: no {kinds[field]} {ref['name']}"


def test_containers_run_the_project_image_locked_down() -> None:
    empty_dirs = {
        where: {volume["name"] for volume in pod_spec["volumes"] if "emptyDir" in volume}
        for where, pod_spec in pod_specs()
    }
    for where, container in containers():
        assert container["image"] == IMAGE, where  # kustomize `images:` sets name and tag
        context = container["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] == 10001, where
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert context["capabilities"]["drop"] == ["ALL"], where
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        pod = where.rsplit(":", 1)[0]
        assert mounts.get("/tmp") in empty_dirs[pod], f"{where}: no emptyDir at /tmp"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KNATIVE / "kustomization.yaml").read_text())
    files = {path.name for path in KNATIVE.glob("*.yaml")} - {"kustomization.yaml"}
    assert files >= UNLISTED
    assert sorted(kustomization["resources"]) == sorted(files - UNLISTED)
    assert [image["name"] for image in kustomization["images"]] == [IMAGE]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomization_builds_with_the_image_set() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(KNATIVE)], capture_output=True, text=True, check=True
    ).stdout
    images = set(re.findall(r"^\s*image: (\S+)$", built, re.MULTILINE))
    assert images == {f"{IMAGE}:latest"}
