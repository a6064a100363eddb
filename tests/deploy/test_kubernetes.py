"""deploy/k8s: each overlay, built by the real kustomize (kubectl's), is valid Kubernetes and matches the
services' settings, ports, probes and the observability config."""

from __future__ import annotations

import copy
import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import yaml

import infermesh
from demo.seed import demo_views
from gateway.auth import KeyStore
from tests.deploy.artifacts import (
    DEPLOY,
    FEEDBACK_USER,
    PREDICTION_LOG_USER,
    SERVICES,
    by_kind,
    compose_env,
    compose_services,
    configmap_or_secret_data,
    container_env,
    deployment_module,
    host_port,
    kustomize_build,
    redis_acl_rules,
    selects,
    service_settings,
)
from tests.deploy.promql import selectors

OVERLAYS = ["overlays/cpu", "overlays/gpu", "overlays/demo"]
# The oldest Kubernetes we support (native gRPC probes are GA since 1.27) and the newest schema we have.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
NAMESPACE = "infermesh"
CERT_MANAGER = "cert-manager.io/v1"
Docs = tuple[dict[str, Any], ...]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return pod_spec(deployment)["containers"][0]


def services_of(docs: Docs) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """module → (Deployment, settings of its main container) for the four infermesh services."""
    found = {}
    for deployment in by_kind(docs, "Deployment").values():
        module = deployment_module(deployment)
        if module:
            found[module] = (deployment, service_settings(module, container_env(docs, main_container(deployment))))
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> Docs:
    return kustomize_build(request.param)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", ["base", *OVERLAYS])
def test_valid_against_the_kubernetes_schemas(path: str, version: str) -> None:
    for doc in kustomize_build(path):
        if doc["apiVersion"] == CERT_MANAGER:
            continue  # a CRD kubernetes-validate has no schema for: test_certificates checks these
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): {error.message}")


def test_the_schema_check_can_fail() -> None:
    deployment = copy.deepcopy(next(d for d in kustomize_build("overlays/cpu") if d["kind"] == "Deployment"))
    main_container(deployment)["readinessProbe"]["grcp"] = {"port": 8001}  # a typo: strict mode rejects it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_all_four_services_and_redis_are_deployed(docs: Docs) -> None:
    modules = services_of(docs)
    assert set(modules) == set(SERVICES)
    for module, (deployment, _) in modules.items():
        assert deployment["metadata"]["name"] == SERVICES[module].compose_name
    assert "redis" in by_kind(docs, "Deployment")
    assert "demo-seed" in by_kind(docs, "Job")


def test_everything_is_in_the_namespace(docs: Docs) -> None:
    assert by_kind(docs, "Namespace")[NAMESPACE]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "restricted"
    )
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


def test_settings_ports_and_probes(docs: Docs) -> None:
    for module, (deployment, settings) in services_of(docs).items():
        container = main_container(deployment)
        assert container["args"] == [module], "the image's entrypoint is `python -m`"
        assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        expected_ports = {"grpc": settings.port, "metrics": settings.metrics_port, "health": settings.health_port}
        if module == "gateway":  # the same API over HTTP/REST
            expected_ports["http"] = settings.http_port
        assert ports == expected_ports, module
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # Native gRPC probes on the health port of its own: a flooded API port never fails a probe.
            expected = {"port": settings.health_port}
            if module == "router" and probe == "readinessProbe":
                # Ready only with a healthy model replica (its API's status); alive whatever its replicas do.
                expected["service"] = "inference.GRPCInferenceService"
            assert container[probe]["grpc"] == expected, f"{module} {probe}"
        template = deployment["spec"]["template"]
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] > settings.grace_period_s + 5


def test_same_ports_as_compose(docs: Docs) -> None:
    composed_services = compose_services()
    for module, (_, settings) in services_of(docs).items():
        composed = service_settings(module, compose_env(composed_services[module][1]))
        ports = (settings.port, settings.metrics_port, settings.health_port)
        assert ports == (composed.port, composed.metrics_port, composed.health_port), module
        assert getattr(settings, "http_port", -1) == getattr(composed, "http_port", -1), module


def test_pods_are_hardened(docs: Docs) -> None:
    workloads = [*by_kind(docs, "Deployment").values(), *by_kind(docs, "Job").values()]
    for workload in workloads:
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, name
        # Service links would inject e.g. GATEWAY_PORT=tcp://10.0.0.1:8001 — the name of a gateway setting.
        assert spec["enableServiceLinks"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{container['name']}"
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            if not container["image"].startswith("redis:"):
                assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"


def test_every_deployment_has_a_disruption_budget_and_service(docs: Docs) -> None:
    budgets = by_kind(docs, "PodDisruptionBudget").values()
    services = by_kind(docs, "Service").values()
    for module, (deployment, settings) in services_of(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)], f"{module}: no PDB"
        matching = [s for s in services if selects(s["spec"]["selector"], labels)]
        assert len(matching) == 1, f"{module}: expected one Service"
        port, *others = matching[0]["spec"]["ports"]
        assert port["port"] == settings.port and port["targetPort"] == "grpc"
        if module == "gateway":
            assert others == [
                {"name": "http", "port": settings.http_port, "targetPort": "http", "appProtocol": "https"}
            ]
        else:
            assert others == [], module


def headless(docs: Docs, name: str) -> dict[str, Any]:
    service = by_kind(docs, "Service")[name]
    assert service["spec"]["clusterIP"] == "None", f"{name} must be headless: DNS lists every pod"
    return service


def test_router_discovers_model_replicas_through_dns(docs: Docs) -> None:
    modules = services_of(docs)
    router = modules["router"][1]
    assert router.model_replicas == "", "no fixed replica list in Kubernetes"
    host, port = host_port(router.model_service_dns)
    service = headless(docs, host)
    model_deployment, model_settings = modules["model_service"]
    assert selects(service["spec"]["selector"], model_deployment["spec"]["template"]["metadata"]["labels"])
    assert port == model_settings.port
    assert service["spec"]["publishNotReadyAddresses"] is False, "only ready pods get traffic"


def test_gateway_balances_over_router_pods(docs: Docs) -> None:
    modules = services_of(docs)
    address = modules["gateway"][1].router_address
    assert address.startswith("dns:///"), "gRPC's DNS resolver sees every router pod"
    host, port = host_port(address)
    service = headless(docs, host)
    assert selects(service["spec"]["selector"], modules["router"][0]["spec"]["template"]["metadata"]["labels"])
    assert port == modules["router"][1].port


def test_router_reaches_the_feature_service(docs: Docs) -> None:
    modules = services_of(docs)
    host, port = host_port(modules["router"][1].feature_service_address)
    service = by_kind(docs, "Service")[host]
    assert selects(service["spec"]["selector"], modules["feature_service"][0]["spec"]["template"]["metadata"]["labels"])
    assert port == modules["feature_service"][1].port


def test_feature_service_uses_the_demo_redis_and_the_views_configmap(docs: Docs) -> None:
    deployment, settings = services_of(docs)["feature_service"]
    redis_url = urlsplit(settings.redis_url)
    assert redis_url.scheme == "rediss", "Redis over TLS"
    redis_host, redis_port = redis_url.hostname, redis_url.port
    assert redis_host is not None
    redis_service = by_kind(docs, "Service")[redis_host]
    assert redis_service["spec"]["ports"][0]["port"] == redis_port
    assert any("secretRef" in source for source in main_container(deployment)["envFrom"]), "Redis URL is a Secret"
    mount = next(m for m in main_container(deployment)["volumeMounts"] if m["name"] == "feature-views")
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "feature-views")
    views = configmap_or_secret_data(docs, "ConfigMap", volume["configMap"]["name"])
    assert str(settings.views_path) == f"{mount['mountPath']}/feature_views.json"
    assert json.loads(views["feature_views.json"]) == demo_views(), "the demo's views, as demo/seed.py writes them"


def test_redis_is_persistent(docs: Docs) -> None:
    redis = by_kind(docs, "Deployment")["redis"]
    args = " ".join(main_container(redis)["args"])
    assert "--appendonly yes" in args and "--appendfsync everysec" in args and "noeviction" in args
    assert redis["spec"]["strategy"]["type"] == "Recreate"
    volume = next(v for v in pod_spec(redis)["volumes"] if "persistentVolumeClaim" in v)
    claim = by_kind(docs, "PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_demo_init_steps(docs: Docs) -> None:
    modules = services_of(docs)
    for module in ("gateway", "router"):  # they learn the models from the model services
        deployment, _settings = modules[module]
        initial = [c["name"] for c in pod_spec(deployment).get("initContainers", [])]
        assert initial == (["key-guard"] if module == "gateway" else []), module  # the guard, no demo.setup
        assert "demo" not in {v["name"] for v in pod_spec(deployment)["volumes"]}
    for module in ("model_service",):
        deployment, settings = modules[module]
        (init,) = pod_spec(deployment)["initContainers"]
        assert init["args"] == ["demo.setup", "--out", "/demo"]
        assert init["image"] == main_container(deployment)["image"]
        assert str(settings.model_repository) == "/demo/model_repository"
        mounts = {m["name"]: m for m in main_container(deployment)["volumeMounts"]}
        assert mounts["demo"]["mountPath"] == "/demo" and mounts["demo"]["readOnly"] is True
    seed = main_container(by_kind(docs, "Job")["demo-seed"])
    assert seed["args"][:3] == ["demo.seed", "--redis-url", "$(FEATURE_SERVICE_REDIS_URL)"]
    assert "FEATURE_SERVICE_REDIS_URL" in container_env(docs, seed)


def test_api_keys_are_hashes_in_a_secret(docs: Docs) -> None:
    deployment, settings = services_of(docs)["gateway"]
    mount = next(m for m in main_container(deployment)["volumeMounts"] if m["name"] == "api-keys")
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "api-keys")
    assert str(settings.api_keys_path) == f"{mount['mountPath']}/api_keys.json"
    data = configmap_or_secret_data(docs, "Secret", volume["secret"]["secretName"])
    keys = json.loads(data["api_keys.json"])["keys"]
    assert keys and all(re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) for entry in keys)
    compose_keys = (DEPLOY / "compose" / "api_keys.demo.json").read_text()
    assert json.loads(compose_keys) == json.loads(data["api_keys.json"]), "the same demo key as compose"
    assert KeyStore.load(DEPLOY / "compose" / "api_keys.demo.json").authenticate("Bearer im_demo_change_me")


def test_hpa_scales_the_model_service_on_the_adapter_metric(docs: Docs) -> None:
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
    target = hpa["spec"]["scaleTargetRef"]
    model_deployment = services_of(docs)["model_service"][0]
    assert (target["kind"], target["name"]) == ("Deployment", model_deployment["metadata"]["name"])
    assert "replicas" not in model_deployment["spec"], "the HPA owns the replica count (apply must not reset it)"
    assert hpa["spec"]["minReplicas"] >= 2
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    assert pods_metrics == ["infermesh_model_service_inflight"]
    rule = served[pods_metrics[0]]
    (series,) = selectors(rule["seriesQuery"])
    assert series.name == "infermesh_inflight_requests"
    assert ("service", "=", "model_service") in series.matchers
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_kubernetes_scrape_config_gives_the_labels_the_adapter_and_rules_need(docs: Docs) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    targets = {r["target_label"]: r["source_labels"] for r in job["relabel_configs"] if "target_label" in r}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    assert targets["job"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    compose_jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())[
        "scrape_configs"]}  # fmt: skip
    scraped = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] for d, _ in services_of(docs).values()
    }
    assert scraped == compose_jobs, "job names are the same in compose and Kubernetes (rules use them)"
    keep_port = next(
        r for r in job["relabel_configs"] if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    )
    assert keep_port["regex"] == "metrics"


def test_images_are_pinned_to_the_release(docs: Docs) -> None:
    version = infermesh.__version__
    for workload in [*by_kind(docs, "Deployment").values(), *by_kind(docs, "Job").values()]:
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), image
            if image.startswith("infermesh"):
                assert image.split(":")[1] in (version, f"{version}-cuda"), image


def test_cpu_overlay_uses_no_gpu() -> None:
    docs = kustomize_build("overlays/cpu")
    deployment, settings = services_of(docs)["model_service"]
    assert "nvidia.com/gpu" not in json.dumps(deployment)
    assert main_container(deployment)["image"] == f"infermesh:{infermesh.__version__}"
    assert settings.device == "auto"


def test_gpu_overlay() -> None:
    docs = kustomize_build("overlays/gpu")
    modules = services_of(docs)
    deployment, settings = modules["model_service"]
    container = main_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(deployment)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(deployment)[
        "tolerations"
    ]
    assert container["image"] == f"infermesh:{infermesh.__version__}-cuda"
    assert settings.device == "cuda"
    for module in ("gateway", "router", "feature_service"):
        other = modules[module][0]
        assert "nvidia.com/gpu" not in json.dumps(other), f"{module} needs no GPU"
        assert main_container(other)["image"] == f"infermesh:{infermesh.__version__}"


# ------------------------------------------------------------------------------------------------ TLS


def mounted_secret(docs: Docs, workload: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in the workload's main container."""
    for mount in main_container(workload).get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
            assert "secret" in volume, f"{path} is not from a Secret"
            return volume["secret"]["secretName"], path.removeprefix(prefix)
    raise AssertionError(f"nothing mounted at {path}")


def generated(name: str) -> str:
    """A generated ConfigMap's or Secret's name without kustomize's content hash."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def certificates(docs: Docs) -> dict[str, dict[str, Any]]:
    """secretName → Certificate."""
    return {doc["spec"]["secretName"]: doc for doc in docs if doc["kind"] == "Certificate"}


def test_certificates(docs: Docs) -> None:
    issuers = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Issuer"}
    for doc in docs:
        if doc["apiVersion"] == CERT_MANAGER:
            assert doc["kind"] in ("Issuer", "Certificate"), doc["kind"]
    ca_certificate = certificates(docs)["infermesh-ca"]
    assert ca_certificate["spec"]["isCA"] is True
    assert issuers[ca_certificate["spec"]["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
    assert issuers["infermesh-ca"]["spec"] == {"ca": {"secretName": "infermesh-ca"}}
    for secret, certificate in certificates(docs).items():
        if secret == "infermesh-ca":
            continue
        spec = certificate["spec"]
        assert spec["issuerRef"] == {"name": "infermesh-ca", "kind": "Issuer"}, secret
        if secret == "feature-ingest-tls":  # a writer's: client use only
            assert spec["usages"] == ["client auth", "digital signature", "key encipherment"]
        else:
            assert "server auth" in spec["usages"], secret
        assert spec["privateKey"]["rotationPolicy"] == "Always" and spec["renewBefore"], secret


def test_every_hop_is_mutual_tls_with_a_certificate_for_the_name_dialed(docs: Docs) -> None:
    modules = services_of(docs)
    issued = certificates(docs)
    names: dict[str, list[str]] = {}
    for module, (deployment, settings) in modules.items():
        server, client = settings.server_tls(), settings.client_tls()
        assert server is not None and client is not None, f"{module} must serve and call over TLS"
        assert server.require_client_cert == (module != "gateway"), module
        files = {mounted_secret(docs, deployment, str(path)) for path in (server.cert_file, server.key_file)}
        (secret,) = {name for name, _ in files}
        assert files == {(secret, "tls.crt"), (secret, "tls.key")}
        assert mounted_secret(docs, deployment, str(client.ca_file)) == (secret, "ca.crt")
        usages = issued[secret]["spec"]["usages"]
        assert "client auth" in usages, f"{module} presents its certificate to the next hop"
        names[module] = issued[secret]["spec"]["dnsNames"]
    router, gateway = modules["router"][1], modules["gateway"][1]
    # The host each client dials (and checks the certificate against) is in the callee's certificate.
    assert host_port(gateway.router_address)[0] in names["router"]
    assert host_port(router.feature_service_address)[0] in names["feature_service"]
    assert host_port(router.model_service_dns)[0] in names["model_service"]  # pods are called by IP
    redis_host = urlsplit(modules["feature_service"][1].redis_url).hostname
    assert redis_host in issued["redis-tls"]["spec"]["dnsNames"]


def test_redis_speaks_only_tls_to_an_acl_user(docs: Docs) -> None:
    redis = by_kind(docs, "Deployment")["redis"]
    container = main_container(redis)
    script = container["args"][0]
    assert container["command"] == ["/bin/sh", "-ec"]
    assert "--port 0 --tls-port 6379" in script and "user default off" in script
    assert '"$(cat /etc/redis/credentials/feedback-password)" > /tmp/users.acl' in script
    assert mounted_secret(docs, redis, "/etc/redis/tls/tls.key") == ("redis-tls", "tls.key")
    credentials, key = mounted_secret(docs, redis, "/etc/redis/credentials/password")
    assert generated(credentials) == "redis-credentials" and key == "password"
    tmp = next(v for v in pod_spec(redis)["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"]["medium"] == "Memory", "the ACL file holds the password: never on disk"
    deployment, settings = services_of(docs)["feature_service"]
    assert settings.redis_username == "infermesh"
    assert mounted_secret(docs, deployment, str(settings.redis_password_file)) == (credentials, "password")
    assert mounted_secret(docs, deployment, str(settings.redis_ca_file)) == ("feature-service-tls", "ca.crt")
    assert configmap_or_secret_data(docs, "Secret", credentials)["password"]
    seed = by_kind(docs, "Job")["demo-seed"]
    args = " ".join(main_container(seed)["args"])
    assert "--username infermesh --password-file /etc/infermesh/redis/password --ca-file /etc/infermesh/tls/ca.crt" in (
        args
    )
    assert mounted_secret(docs, seed, "/etc/infermesh/redis/password") == (credentials, "password")


# ------------------------------------------------------------------------------------------------ NetworkPolicy


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", "the evaluator knows In only"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _peer_matches(peer: dict[str, Any], namespace: dict[str, str], pod: dict[str, str], own: str) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], namespace):
            return False
    elif namespace.get("kubernetes.io/metadata.name") != own:
        return False  # a podSelector alone means pods of the policy's own namespace
    return _matches(peer.get("podSelector", {}), pod)


def _allowed(
    policies: list[dict[str, Any]],
    direction: str,
    subject: dict[str, str],
    peer_namespace: dict[str, str],
    peer: dict[str, str],
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Kubernetes NetworkPolicy semantics for one direction of one connection of a pod in NAMESPACE."""
    policy_type, rules_key, peers_key = (
        ("Ingress", "ingress", "from") if direction == "ingress" else ("Egress", "egress", "to")
    )
    selecting = [
        p for p in policies if policy_type in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"], subject)
    ]
    if not selecting:
        return True  # no policy isolates this pod in this direction
    for policy in selecting:
        for rule in policy["spec"].get(rules_key, []):
            ports = rule.get("ports")
            if ports is not None and not any(
                p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
            ):
                continue
            peers = rule.get(peers_key)
            if peers is None or any(_peer_matches(x, peer_namespace, peer, NAMESPACE) for x in peers):
                return True
    return False


MESH = {"kubernetes.io/metadata.name": NAMESPACE}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}
ELSEWHERE = {"kubernetes.io/metadata.name": "default"}
DNS = {"k8s-app": "kube-dns"}


def pod(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "infermesh"}


@pytest.fixture(scope="module")
def policies() -> list[dict[str, Any]]:
    return list(by_kind(kustomize_build("overlays/cpu"), "NetworkPolicy").values())


def connects(
    policies: list[dict[str, Any]],
    source: tuple[dict[str, str], dict[str, str]],
    target: tuple[dict[str, str], dict[str, str]],
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether a connection from `source` to `target` (each (namespace labels, pod labels)) gets through."""
    (source_namespace, source_pod), (target_namespace, target_pod) = source, target
    mesh_policies = policies  # all in NAMESPACE: they govern only pods there
    egress = source_namespace != MESH or _allowed(
        mesh_policies, "egress", source_pod, target_namespace, target_pod, port, protocol
    )
    ingress = target_namespace != MESH or _allowed(
        mesh_policies, "ingress", target_pod, source_namespace, source_pod, port, protocol
    )
    return egress and ingress


def test_the_namespace_denies_by_default(policies: list[dict[str, Any]]) -> None:
    default = next(p for p in policies if p["metadata"]["name"] == "default-deny")
    assert default["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_network_policies_allow_each_hop_and_nothing_else(docs: Docs, policies: list[dict[str, Any]]) -> None:
    modules = services_of(docs)
    ports = {module: settings.port for module, (_, settings) in modules.items()}
    metrics = {module: settings.metrics_port for module, (_, settings) in modules.items()}
    names = {module: SERVICES[module].compose_name for module in SERVICES}
    mesh = {module: (MESH, pod(name)) for module, name in names.items()}
    redis, seed, ingest = (MESH, pod("redis")), (MESH, pod("demo-seed")), (MESH, pod("feature-ingest"))
    hops = {
        ("gateway", "router"),
        ("router", "feature_service"),
        ("router", "model_service"),
    }
    for source in SERVICES:
        for target in SERVICES:
            allowed = connects(policies, mesh[source], mesh[target], ports[target])
            assert allowed == ((source, target) in hops), f"{source} → {target}:{ports[target]}"
        # The feature store; the router's prediction log; the gateway's label feedback.
        assert connects(policies, mesh[source], redis, 6379) == (source != "model_service"), f"{source} → redis"
        # The ingestion Job writes features, and reaches nothing else.
        assert connects(policies, ingest, mesh[source], ports[source]) == (source == "feature_service"), source
        assert not connects(policies, mesh[source], ingest, 8021), source
        # Prometheus in `monitoring` scrapes the metrics port; nothing else reaches it, nor the API ports.
        assert connects(policies, (MONITORING, {"app": "prometheus"}), mesh[source], metrics[source]), source
        assert not connects(policies, (ELSEWHERE, {"app": "x"}), mesh[source], metrics[source]), source
        assert not connects(policies, (MONITORING, {"app": "prometheus"}), mesh[source], ports[source]) or (
            source == "gateway"
        )
        # Cluster DNS, and nothing else outside the namespace.
        assert connects(policies, mesh[source], (KUBE_SYSTEM, DNS), 53, "UDP"), source
        assert not connects(policies, mesh[source], (ELSEWHERE, {"app": "x"}), 443), source
    assert connects(policies, seed, redis, 6379)
    assert not connects(policies, ingest, redis, 6379), "ingestion goes through the feature service's checks"
    assert not connects(policies, (MESH, pod("intruder")), redis, 6379)
    # The gateway is the public endpoint: reachable from anywhere, on its API port only.
    assert connects(policies, (ELSEWHERE, {"app": "client"}), mesh["gateway"], ports["gateway"])
    assert not connects(policies, (ELSEWHERE, {"app": "client"}), mesh["router"], ports["router"])
    assert not connects(policies, (ELSEWHERE, {"app": "client"}), mesh["gateway"], metrics["gateway"] + 1)


def test_redis_is_at_least_7_4_6(docs: Docs) -> None:
    """7.4.6 fixes CVE-2025-49844 (a use-after-free reachable from Lua scripts, which the feature store runs)."""
    images = [
        container["image"]
        for document in docs
        if document.get("kind") in ("Deployment", "StatefulSet")
        for container in document["spec"]["template"]["spec"]["containers"]
        if container["image"].startswith("redis:")
    ]
    assert images, "no Redis in the base"
    for image in images:
        assert version_of(image) >= (7, 4, 6), image


def version_of(image: str) -> tuple[int, ...]:
    match = re.fullmatch(r"[^:]+:(\d+)\.(\d+)\.(\d+)(-[a-z0-9.]+)?", image)
    assert match is not None, f"{image}: pin an exact version"
    return tuple(int(part) for part in match.groups()[:3])


# ------------------------------------------------------------------------------------------------ #15, #11, key guard


def secret_volume(workload: dict[str, Any], path: str) -> dict[str, Any]:
    mount = next(m for m in main_container(workload)["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume: dict[str, Any] = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])["secret"]
    return volume


def test_the_router_logs_predictions_and_the_gateway_takes_labels(docs: Docs) -> None:
    modules = services_of(docs)
    (router_deployment, router), (gateway_deployment, gateway) = modules["router"], modules["gateway"]
    redis_deployment = by_kind(docs, "Deployment")["redis"]
    redis_script = main_container(redis_deployment)["args"][0]
    rules = redis_acl_rules(redis_script)
    issued = certificates(docs)
    clients = (
        (router_deployment, router.prediction_log_redis_url, router.prediction_log_redis_password_file,
         PREDICTION_LOG_USER, "prediction-log-password"),
        (gateway_deployment, gateway.feedback_redis_url, gateway.feedback_redis_password_file,
         FEEDBACK_USER, "feedback-password"),
    )  # fmt: skip
    for deployment, url, password_file, user, key in clients:
        parts = urlsplit(url)
        assert parts.scheme == "rediss" and parts.username == user and parts.password is None, url
        assert parts.hostname in issued["redis-tls"]["spec"]["dnsNames"]
        assert by_kind(docs, "Service")[str(parts.hostname)]["spec"]["ports"][0]["port"] == parts.port
        (ca_file,) = parse_qs(parts.query)["ssl_ca_certs"]
        own_tls = mounted_secret(docs, deployment, ca_file)
        assert own_tls[1] == "ca.crt" and own_tls[0].endswith("-tls"), "the mesh CA, which signed Redis's certificate"
        assert user in rules
        credentials, item = mounted_secret(docs, deployment, str(password_file))
        assert generated(credentials) == "redis-credentials" and item == key
        # Only its own password of the Secret's three.
        assert secret_volume(deployment, str(password_file))["items"] == [{"key": key, "path": key}]
        assert configmap_or_secret_data(docs, "Secret", credentials)[key]
        # Redis reads that password into the user's ACL line.
        assert f'"$(cat /etc/redis/credentials/{key})"' in redis_script
    assert gateway.feedback_stream == router.prediction_log_stream
    stream = router.prediction_log_stream
    assert f"resetkeys ~{stream} ~{stream}:request:* " in rules[PREDICTION_LOG_USER]
    assert f"resetkeys ~{stream}:request:* " in rules[FEEDBACK_USER]
    hash_secret, hash_key = mounted_secret(docs, router_deployment, str(router.prediction_log_hash_key_file))
    assert generated(hash_secret) == "prediction-log"
    assert len(configmap_or_secret_data(docs, "Secret", hash_secret)[hash_key].encode()) >= 16
    assert router.prediction_log_max_len <= 10_000 and 0 < router.prediction_log_index_ttl_s <= 86_400
    passwords = configmap_or_secret_data(docs, "Secret", credentials)
    assert len(set(passwords.values())) == 3, "one password per Redis user"


def test_feature_writes_take_the_ingest_certificate(docs: Docs) -> None:
    settings = services_of(docs)["feature_service"][1]
    (writer,) = settings.writers()
    issued = certificates(docs)
    assert issued["feature-ingest-tls"]["spec"]["commonName"] == writer
    for secret, certificate in issued.items():  # the mesh's own certificates name no writer
        if secret != "feature-ingest-tls":
            assert writer != certificate["spec"]["commonName"] and writer not in certificate["spec"].get("dnsNames", [])
    job = yaml.safe_load((DEPLOY / "k8s" / "feature-ingest-job.yaml").read_text())
    kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)
    assert job["metadata"]["namespace"] == NAMESPACE
    policy = by_kind(docs, "NetworkPolicy")["feature-ingest"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"])
    assert mounted_secret(docs, job, "/etc/infermesh/tls/tls.crt") == ("feature-ingest-tls", "tls.crt")
    args = main_container(job)["args"]
    assert args[:3] == ["infermesh.cli", "features", "ingest"]
    flags = dict(zip(args[3:-2:2], args[4:-2:2], strict=True))
    assert host_port(flags["--url"]) == ("feature-service", settings.port)
    assert flags["--cert"] == "/etc/infermesh/tls/tls.crt" and flags["--key"] == "/etc/infermesh/tls/tls.key"
    assert flags["--ca"] == "/etc/infermesh/tls/ca.crt"
    spec = pod_spec(job)
    assert spec["automountServiceAccountToken"] is False and spec["securityContext"]["runAsNonRoot"] is True
    assert main_container(job)["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_gateway_refuses_the_published_demo_key_unless_allowed(path: str) -> None:
    docs = kustomize_build(path)
    deployment, settings = services_of(docs)["gateway"]
    (guard,) = pod_spec(deployment)["initContainers"]
    assert guard["image"] == main_container(deployment)["image"]
    assert guard["args"] == ["demo.key_guard", str(settings.api_keys_path)], "the file the gateway loads"
    mount = next(m for m in guard["volumeMounts"] if str(settings.api_keys_path).startswith(m["mountPath"] + "/"))
    gateway_mount = next(m for m in main_container(deployment)["volumeMounts"] if m["name"] == "api-keys")
    assert (mount["name"], mount["mountPath"]) == ("api-keys", gateway_mount["mountPath"])
    allowed = container_env(docs, guard)["INFERMESH_ALLOW_DEMO_KEY"]
    assert allowed == ("1" if path == "overlays/demo" else "0"), "off unless the demo overlay allows it"
