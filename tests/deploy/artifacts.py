"""Loaders shared by the deployment tests: the compose files, kustomize builds, env → service settings.

The services' own settings classes are the reference: an env var a deployment sets must be a field of the
service it configures, and its value must pass that field's validation.
"""

from __future__ import annotations

import base64
import functools
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

from feature_service.settings import FeatureServiceSettings
from gateway.settings import GatewaySettings
from model_service.settings import ModelServiceSettings
from router.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent  # kubectl and hadolint come as wheels in the dev extra


@dataclass(frozen=True)
class ServiceSpec:
    module: str  # python -m <module>
    prefix: str
    settings: type[BaseSettings]
    compose_name: str  # also the Kubernetes Deployment name and the Prometheus job


SERVICES = {
    spec.module: spec
    for spec in (
        ServiceSpec("gateway", "GATEWAY_", GatewaySettings, "gateway"),
        ServiceSpec("router", "ROUTER_", RouterSettings, "router"),
        ServiceSpec("feature_service", "FEATURE_SERVICE_", FeatureServiceSettings, "feature-service"),
        ServiceSpec("model_service", "MODEL_SERVICE_", ModelServiceSettings, "model-service"),
    )
}
# Env vars a service may get besides its own prefix: the standard OpenTelemetry ones.
FOREIGN_ENV = re.compile(r"^OTEL_[A-Z_]+$")


def service_settings(module: str, env: dict[str, str]) -> BaseSettings:
    """Validate `env` as the service's environment: every prefixed var is a field; values parse."""
    spec = SERVICES[module]
    fields: dict[str, str] = {}
    for name, value in env.items():
        if name.startswith(spec.prefix):
            field = name[len(spec.prefix) :].lower()
            assert field in spec.settings.model_fields, f"{module}: {name} is not a setting of {spec.settings}"
            fields[field] = value
        else:
            assert FOREIGN_ENV.match(name), f"{module}: {name} is neither a {spec.prefix}* setting nor OTEL_*"
    return spec.settings(**fields)  # type: ignore[call-arg]  # pydantic validates and coerces each value


def host_port(address: str) -> tuple[str, int]:
    """`host:port` or `dns:///host:port` → (host, port)."""
    target = address.removeprefix("dns:///")
    host, _, port = target.rpartition(":")
    assert host and port.isdigit(), f"not host:port: {address}"
    return host, int(port)


# ------------------------------------------------------------------------------------------------ compose

_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` with no variable set: what a plain `docker compose up` uses (`$$` is a `$`)."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: "$" if m.group(0) == "$$" else m.group("default") or "", value)
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    return value


@functools.cache
def compose_raw(name: str = "docker-compose.yml") -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    return interpolate(compose_raw(name))


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def compose_module(service: dict[str, Any]) -> str | None:
    """The infermesh module a compose service runs (`command: [module]` after the image's `python -m`)."""
    command = service.get("command")
    if "entrypoint" in service or not isinstance(command, list) or len(command) != 1:
        return None
    return command[0] if command[0] in SERVICES else None


def compose_services() -> dict[str, tuple[str, dict[str, Any]]]:
    """module → (compose service name, service) for the four infermesh services of docker-compose.yml."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, service in compose()["services"].items():
        module = compose_module(service)
        if module:
            assert module not in found, f"{module} runs in two compose services"
            found[module] = (name, service)
    return found


# ------------------------------------------------------------------------------------------------ kubernetes


@functools.cache
def kustomize_build(path: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize deploy/k8s/<path>`: the real kustomize (kubectl's), no cluster needed."""
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kustomize {path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def configmap_or_secret_data(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, str]:
    found = by_kind(docs, kind)
    assert name in found, f"{kind} {name} is referenced but not defined"
    document = found[name]
    if kind == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in document.get("data", {}).items()}
        data.update(document.get("stringData", {}))
        return data
    return dict(document.get("data", {}))


def container_env(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: envFrom sources in order, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmap_or_secret_data(docs, "ConfigMap", source["configMapRef"]["name"]))
        else:
            env.update(configmap_or_secret_data(docs, "Secret", source["secretRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            reference = item["valueFrom"]
            assert "fieldRef" in reference, f"unsupported env source {reference}"
            env[item["name"]] = "<" + reference["fieldRef"]["fieldPath"] + ">"
    return env


def deployment_module(deployment: dict[str, Any]) -> str | None:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    args = containers[0].get("args", [])
    return args[0] if len(args) == 1 and args[0] in SERVICES else None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# ------------------------------------------------------------------------------------------------ redis ACL

_ACL_RULE = re.compile(r"user (?P<user>[a-z-]+) on >%s (?P<rule>[^\\']+)")
MESH_USER = "infermesh"  # the feature store's
PREDICTION_LOG_USER = "prediction-log"  # the router's prediction log
FEEDBACK_USER = "feedback"  # the gateway's label feedback


def redis_acl_rules(script: str) -> dict[str, str]:
    """Each ACL user's rule (without its password) in a Redis start script: `user NAME on >%s RULE`."""
    rules = {found.group("user"): found.group("rule").strip() for found in _ACL_RULE.finditer(" ".join(script.split()))}
    assert MESH_USER in rules, "no `user infermesh on >%s ...` ACL line in the Redis start script"
    return rules


def redis_acl_rule(script: str) -> str:
    """The `infermesh` ACL user's rule (without its password) in a Redis start script."""
    return redis_acl_rules(script)[MESH_USER]


def redis_start_script_of_kubernetes() -> str:
    redis = by_kind(kustomize_build("base"), "Deployment")["redis"]
    return str(redis["spec"]["template"]["spec"]["containers"][0]["args"][0])


def redis_acl_rule_of_kubernetes() -> str:
    return redis_acl_rule(redis_start_script_of_kubernetes())
