"""docker-compose.yml (+ the GPU override): valid Compose, and wired to the services' real settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from feature_service.writers import read_token_digests, token_digest
from gateway.auth import KeyStore, hash_key
from tests.deploy.artifacts import (
    DEPLOY,
    ROOT,
    SERVICES,
    compose,
    compose_env,
    compose_raw,
    compose_services,
    host_port,
    redis_acl_rule,
    redis_acl_rule_of_kubernetes,
    redis_acl_rules,
    redis_start_script_of_kubernetes,
    service_settings,
)

DEMO_KEY = "im_demo_change_me"  # documented in docker-compose.yml and README "Deploy"
UIS = {"grafana": 3000, "jaeger": 16686, "prometheus": 9090}


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as vendored by the check-jsonschema package."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_valid_against_the_compose_spec(name: str) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose_raw(name)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_file() -> None:
    """The check above can fail: an unknown key and a wrong type are reported."""
    schema = compose_schema()
    broken = yaml.safe_load("services: {gateway: {image: x, helthcheck: {}, ports: {a: 1}}}")
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert len(list(validator.iter_errors(broken))) >= 2


def test_every_service_runs_once_with_the_image_entrypoint() -> None:
    services = compose_services()
    assert set(services) == set(SERVICES)
    for module, (name, _service) in services.items():
        assert name == SERVICES[module].compose_name


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_env_is_the_services_settings(module: str) -> None:
    name, service = compose_services()[module]
    settings = service_settings(module, compose_env(service))
    assert settings.host == "0.0.0.0", f"{name} must listen on all interfaces in its container"
    assert settings.metrics_host == "0.0.0.0"
    assert settings.port > 0 and settings.metrics_port > 0, "fixed ports: health checks and scrapes use them"
    assert settings.health_port > 0 and settings.health_port not in (settings.port, settings.metrics_port)
    healthcheck = service["healthcheck"]["test"]
    # On the health port of its own: a flooded API port must not make the container unhealthy.
    assert healthcheck == ["CMD", "grpc-health-check", f"127.0.0.1:{settings.health_port}"]
    assert "ports" not in service or module == "gateway", f"{name} must not be published to the host"
    assert service["image"].startswith("infermesh:")


def test_service_addresses_point_at_the_right_services() -> None:
    services = compose_services()
    settings = {module: service_settings(module, compose_env(s)) for module, (_, s) in services.items()}
    names = {module: name for module, (name, _) in services.items()}

    def assert_points_at(address: str, module: str) -> None:
        assert host_port(address) == (names[module], settings[module].port), f"{address} is not {module}"

    assert_points_at(settings["router"].feature_service_address, "feature_service")
    assert_points_at(settings["router"].model_service_dns, "model_service")  # DNS: one address per replica
    assert settings["router"].model_replicas == ""
    assert_points_at(settings["gateway"].router_address, "router")
    assert settings["feature_service"].redis_url == "rediss://redis:6379/0"


def test_model_repository_and_views_come_from_the_init_volume() -> None:
    services = compose()["services"]
    init = services["init"]
    assert init["volumes"] == ["demo:/demo", "certs:/certs:ro"]
    command = init["command"][0]
    assert "python -m demo.setup --out /demo" in command
    assert "python -m demo.seed --redis-url rediss://redis:6379/0 --views /demo/feature_views.json" in command
    # As the feature service: the ACL user, its password from the secret, the CA of Redis's certificate.
    assert "--username infermesh --password-file /run/secrets/redis_password --ca-file /certs/ca.pem" in command
    assert init["secrets"] == ["redis_password"]
    for module, (_name, service) in compose_services().items():
        settings = service_settings(module, compose_env(service))
        if module == "feature_service":
            assert "demo:/demo:ro" in service["volumes"]
            assert str(settings.views_path) == "/demo/feature_views.json"
        elif module == "model_service":
            assert "demo:/demo:ro" in service["volumes"]
            assert str(settings.model_repository) == "/demo/model_repository"
        else:  # the router and gateway learn the models from the model services: no repository of their own
            assert "demo:/demo:ro" not in service.get("volumes", [])
            continue
        assert service["depends_on"].get("init", {"condition": "service_completed_successfully"}) == {
            "condition": "service_completed_successfully"
        }
    assert "demo" in compose()["volumes"]


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        ("demo.setup", ["--out"]),
        ("demo.seed", ["--redis-url", "--views", "--username", "--password-file", "--ca-file"]),
        ("demo.certs", ["--out", "--service-name"]),
    ],
)
def test_init_uses_real_cli_flags(module: str, flags: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT
    )
    for flag in flags:
        assert flag in result.stdout


def test_start_order_follows_health() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            target = services[dependency]
            if "healthcheck" in target:
                assert condition["condition"] == "service_healthy", f"{name} → {dependency}"
            elif dependency in ("init", "certs", "key-guard"):  # one-shots
                assert condition["condition"] == "service_completed_successfully"
            else:
                assert condition["condition"] == "service_started"
    # The chain the mesh needs: redis → init → feature/model services → router → gateway.
    assert set(services["router"]["depends_on"]) >= {"feature-service", "model-service"}
    assert "router" in services["gateway"]["depends_on"]
    assert "redis" in services["feature-service"]["depends_on"]


def test_only_the_gateway_and_the_uis_are_published() -> None:
    services = compose()["services"]
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    # On loopback unless the operator names another address (INFERMESH_GATEWAY_BIND).
    assert published.pop("gateway") == ["127.0.0.1:8001:8001", "127.0.0.1:8000:8000"]  # gRPC, HTTP/REST
    assert compose_raw("docker-compose.yml")["services"]["gateway"]["ports"] == [
        "${INFERMESH_GATEWAY_BIND:-127.0.0.1}:8001:8001",
        "${INFERMESH_GATEWAY_BIND:-127.0.0.1}:8000:8000",
    ]
    assert published == {name: [f"127.0.0.1:{port}:{port}"] for name, port in UIS.items()}, "UIs on loopback only"


def test_containers_are_hardened() -> None:
    services = compose()["services"]
    for name in [name for name, _ in compose_services().values()] + ["init", "certs"]:
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["tmpfs"] == ["/tmp"], name
        assert service.get("cap_add", ["CHOWN"]) == ["CHOWN"] and (name == "certs") == ("cap_add" in service)


def test_two_model_replicas() -> None:
    assert compose()["services"]["model-service"]["deploy"]["replicas"] == 2


def test_api_keys_come_from_a_secret_file_of_hashes() -> None:
    document = compose()
    assert "api_keys" in document["services"]["gateway"]["secrets"]
    settings = service_settings("gateway", compose_env(document["services"]["gateway"]))
    assert str(settings.api_keys_path) == "/run/secrets/api_keys"
    assert compose_raw()["secrets"]["api_keys"]["file"] == (
        "${INFERMESH_API_KEYS_FILE:-./deploy/compose/api_keys.demo.json}"
    ), "overridable from the environment"
    path = ROOT / document["secrets"]["api_keys"]["file"]
    keys = json.loads(path.read_text())["keys"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) for entry in keys), "hashes only"
    assert DEMO_KEY not in path.read_text()
    store = KeyStore.load(path)
    assert store.authenticate(f"Bearer {DEMO_KEY}").allows("fraud"), "the documented demo key works"
    assert hash_key(DEMO_KEY) == keys[0]["sha256"]


def test_redis_persistence_and_health() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["volumes"] == ["redis-data:/data", "certs:/certs:ro"]
    (check,) = redis["healthcheck"]["test"][1:]
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL" and "--tls --cacert /certs/ca.pem --user infermesh" in check
    assert 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)"' in check, "the password stays off the command line"
    assert "ports" not in redis


def test_redis_speaks_only_tls_to_an_acl_user_whose_password_is_a_secret() -> None:
    document = compose()
    redis = document["services"]["redis"]
    script = redis["command"][0]
    assert redis["entrypoint"] == ["/bin/sh", "-ec"] and redis["user"] == "999:1000"  # not root
    assert "--port 0 --tls-port 6379" in script, "no plaintext port"
    assert "--tls-cert-file /certs/redis.pem --tls-key-file /certs/redis.key --tls-ca-cert-file /certs/ca.pem" in script
    assert "user default off" in script
    assert '"$(cat /run/secrets/feedback_redis_password)" > /tmp/users.acl' in script and "umask 077" in script
    assert redis_acl_rule(script) == redis_acl_rule_of_kubernetes(), "compose and Kubernetes grant the same"
    assert redis_acl_rules(script) == redis_acl_rules(redis_start_script_of_kubernetes())
    assert redis["secrets"] == ["redis_password", "prediction_log_redis_password", "feedback_redis_password"]
    for secret in redis["secrets"]:  # each user's password from its own secret, in the ACL file
        assert f'"$(cat /run/secrets/{secret})"' in script
    assert compose_raw()["secrets"]["redis_password"]["file"] == (
        "${INFERMESH_REDIS_PASSWORD_FILE:-./deploy/compose/redis_password.demo}"
    )
    feature_service = document["services"]["feature-service"]
    settings = service_settings("feature_service", compose_env(feature_service))
    assert settings.redis_url == "rediss://redis:6379/0" and settings.redis_username == "infermesh"
    assert str(settings.redis_password_file) == "/run/secrets/redis_password"
    assert str(settings.redis_ca_file) == "/certs/ca.pem"
    assert feature_service["secrets"] == ["redis_password", "feature_write_token_sha256"]


def test_every_hop_is_mutual_tls_with_certificates_for_the_names_called() -> None:
    document = compose()
    certs = document["services"]["certs"]
    assert certs["volumes"] == ["certs:/certs"] and "certs" in document["volumes"]
    generate = certs["command"][0]
    assert "python -m demo.certs --out /certs" in generate
    for module, (name, service) in compose_services().items():
        settings = service_settings(module, compose_env(service))
        server = settings.server_tls()
        client = settings.client_tls()
        assert server is not None and client is not None, f"{name} must serve and call over TLS"
        assert (str(server.cert_file), str(server.key_file)) == (f"/certs/{module}.pem", f"/certs/{module}.key")
        assert str(client.ca_file) == "/certs/ca.pem"
        # Internal hops take only mesh certificates; the gateway's public port takes any TLS client.
        assert server.require_client_cert == (module != "gateway"), name
        assert "certs:/certs:ro" in service["volumes"], name
        assert service["depends_on"].get("certs", document["services"]["redis"]["depends_on"]["certs"]) == {
            "condition": "service_completed_successfully"
        }
        # Its certificate names the host its clients dial.
        assert f"--service-name {module}={name}" in generate, name
    assert "--service-name redis=redis" in generate
    # Keys go to the user that reads them: the image's (10001) and redis's (999).
    assert "chown -R 10001:10001 /certs" in generate and "chown 999:1000 /certs/redis.pem /certs/redis.key" in generate


def test_tracing_goes_to_the_collector_and_on_to_jaeger() -> None:
    document = compose()
    collector = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    receiver = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    for _module, (name, service) in compose_services().items():
        endpoint = compose_env(service)["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint == f"http://otel-collector:{receiver.rsplit(':', 1)[1]}", name
    pipeline = collector["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for component in pipeline[kind]:
            assert component in collector[kind], f"pipeline uses undefined {kind[:-1]} {component}"
    exporter = collector["exporters"][pipeline["exporters"][0]]
    assert exporter["endpoint"] == "jaeger:4317" and "jaeger" in document["services"]
    assert document["services"]["otel-collector"]["volumes"] == [
        "./deploy/otel/collector.yaml:/etc/otelcol/config.yaml:ro"
    ]


def test_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    document = compose()
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for module, (name, service) in compose_services().items():
        settings = service_settings(module, compose_env(service))
        assert name in jobs, f"Prometheus does not scrape {name}"
        (target,) = jobs[name]["dns_sd_configs"]
        assert target == {"names": [name], "type": "A", "port": settings.metrics_port, "refresh_interval": "15s"}
    assert "./deploy/prometheus:/etc/prometheus:ro" in document["services"]["prometheus"]["volumes"]
    assert config["rule_files"] == ["rules/*.yml"] and list((DEPLOY / "prometheus" / "rules").glob("*.yml"))


def test_grafana_provisioning_is_mounted() -> None:
    grafana = compose()["services"]["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/infermesh.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / home.rsplit("/", 1)[1]).exists()
    for mount in grafana["volumes"]:
        source = mount.split(":")[0]
        assert not source.startswith("./") or (ROOT / source).exists(), mount


def test_gpu_override_gives_the_model_service_the_nvidia_device() -> None:
    override = compose("docker-compose.gpu.yml")["services"]
    assert set(override) == {"model-service"}, "only the model service changes"
    model = override["model-service"]
    assert model["build"]["args"] == {"VARIANT": "cuda"}
    assert model["image"].endswith("-cuda")
    (device,) = model["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    merged_env = {**compose_env(compose()["services"]["model-service"]), **compose_env(model)}
    assert service_settings("model_service", merged_env).device == "cuda"


def test_the_gateway_starts_only_after_the_demo_key_guard_passed() -> None:
    services = compose()["services"]
    assert services["gateway"]["depends_on"]["key-guard"] == {"condition": "service_completed_successfully"}
    guard = services["key-guard"]
    assert guard["command"] == ["demo.key_guard", "/run/secrets/api_keys"]  # after the image's `python -m`
    assert guard["secrets"] == ["api_keys"] and "api_keys" in services["gateway"]["secrets"]  # the same file
    assert guard["environment"] == {"INFERMESH_ALLOW_DEMO_KEY": "0"}  # off unless the host sets it
    raw = compose_raw("docker-compose.yml")["services"]["key-guard"]["environment"]
    assert raw == {"INFERMESH_ALLOW_DEMO_KEY": "${INFERMESH_ALLOW_DEMO_KEY:-0}"}
    assert guard["read_only"] is True and guard["cap_drop"] == ["ALL"]


@pytest.mark.parametrize(
    ("allow", "own_keys", "exit_code"), [("", False, 1), ("0", False, 1), ("1", False, 0), ("", True, 0)]
)
def test_the_key_guard_refuses_the_published_demo_key_unless_allowed(
    allow: str, own_keys: bool, exit_code: int, tmp_path: Path
) -> None:
    keys = DEPLOY / "compose" / "api_keys.demo.json"
    if own_keys:
        keys = tmp_path / "api_keys.json"
        keys.write_text(json.dumps({"keys": [{"sha256": hash_key("im_" + "x" * 43), "tenant": "t", "models": []}]}))
    environment = {k: v for k, v in os.environ.items() if k != "INFERMESH_ALLOW_DEMO_KEY"}
    if allow:
        environment["INFERMESH_ALLOW_DEMO_KEY"] = allow
    done = subprocess.run(
        [sys.executable, "-m", "demo.key_guard", str(keys)],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == exit_code, done.stderr
    if exit_code:
        assert "published demo key" in done.stderr and "INFERMESH_API_KEYS_FILE" in done.stderr


def test_redis_and_grafana_images_are_current() -> None:
    services = compose()["services"]
    redis_version = re.fullmatch(r"redis:(\d+)\.(\d+)\.(\d+)-alpine", services["redis"]["image"])
    assert redis_version is not None and tuple(map(int, redis_version.groups())) >= (7, 4, 6)  # CVE-2025-49844
    grafana_version = re.fullmatch(r"grafana/grafana:(\d+)\.(\d+)\.(\d+)", services["grafana"]["image"])
    assert grafana_version is not None and int(grafana_version.group(1)) >= 12


def secret_file(name: str) -> Path:
    """The file a compose secret comes from by default (every one overridable from the environment)."""
    raw = compose_raw()["secrets"][name]["file"]
    assert raw.startswith("${INFERMESH_") and ":-./deploy/compose/" in raw, f"{name}: {raw}"
    path = ROOT / compose()["secrets"][name]["file"]
    assert path.is_file(), path
    return path


def test_every_secret_file_a_service_is_told_about_is_mounted() -> None:
    for name, service in compose()["services"].items():
        mounted = set(service.get("secrets", []))
        for variable, value in compose_env(service).items():
            if value.startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in mounted, f"{name}: {variable}"
        for secret in mounted:
            secret_file(secret)


def redis_user(url: str) -> tuple[str | None, dict[str, list[str]]]:
    parts = urlsplit(url)
    assert parts.scheme == "rediss" and (parts.hostname, parts.port) == ("redis", 6379), url
    assert parts.password is None, "the password comes from a file, never the URL"
    return parts.username, parse_qs(parts.query)


def test_the_router_logs_predictions_and_the_gateway_takes_labels() -> None:
    services = compose()["services"]
    router = service_settings("router", compose_env(services["router"]))
    gateway = service_settings("gateway", compose_env(services["gateway"]))
    rules = redis_acl_rules(services["redis"]["command"][0])
    for settings, user, secret in (
        (router, "prediction-log", "prediction_log_redis_password"),
        (gateway, "feedback", "feedback_redis_password"),
    ):
        url = settings.prediction_log_redis_url if settings is router else settings.feedback_redis_url
        password = (
            settings.prediction_log_redis_password_file if settings is router else settings.feedback_redis_password_file
        )
        username, query = redis_user(url)
        assert username == user and query == {"ssl_ca_certs": ["/certs/ca.pem"]}, "its own ACL user, Redis's CA"
        assert str(password) == f"/run/secrets/{secret}"
        assert user in rules
    assert gateway.feedback_stream == router.prediction_log_stream
    stream = router.prediction_log_stream
    # Each user's keys are the log's: the stream (the router only) and its index entries.
    assert f"resetkeys ~{stream} ~{stream}:request:* " in rules["prediction-log"]
    assert f"resetkeys ~{stream}:request:* " in rules["feedback"] and f"~{stream} " not in rules["feedback"]
    assert str(router.prediction_log_hash_key_file) == "/run/secrets/prediction_log_hash_key"
    assert len(secret_file("prediction_log_hash_key").read_bytes().strip()) >= 16, "the router requires 16 bytes"
    passwords = {secret_file(s).read_text().strip() for s in services["redis"]["secrets"]}
    assert len(passwords) == 3, "one password per Redis user"
    # Bounded next to the features: a shorter stream and index than the defaults.
    assert router.prediction_log_max_len <= 10_000 and 0 < router.prediction_log_index_ttl_s <= 86_400
    assert services["router"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    demo_config = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json; from demo.train import DEMO_LOG_SAMPLE_RATE as r; print(json.dumps(r))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=ROOT,
        ).stdout
    )
    assert demo_config > 0, "the demo's fraud model opts in to the log"


def test_feature_writes_take_the_write_token_of_the_ingest_tool() -> None:
    services = compose()["services"]
    settings = service_settings("feature_service", compose_env(services["feature-service"]))
    assert str(settings.write_token_sha256_file) == "/run/secrets/feature_write_token_sha256"
    token = secret_file("feature_write_token").read_text().strip()
    assert read_token_digests(secret_file("feature_write_token_sha256")) == {token_digest(token)}, "a matching pair"
    # The token only in the tool; the feature service holds only its digest.
    holders = {name for name, service in services.items() if "feature_write_token" in service.get("secrets", [])}
    assert holders == {"feature-ingest"}
    ingest = services["feature-ingest"]
    assert ingest["profiles"] == ["tools"], "run on demand, not by `docker compose up`"
    script = ingest["entrypoint"][2]
    assert 'INFERMESH_FEATURE_WRITE_TOKEN="$(cat /run/secrets/feature_write_token)"' in script
    assert "python -m infermesh.cli features ingest --url feature-service:8021 --ca /certs/ca.pem" in script
    assert "--cert /certs/client.pem --key /certs/client.key" in script
    assert ingest["read_only"] is True and ingest["cap_drop"] == ["ALL"]
    result = subprocess.run(
        [sys.executable, "-m", "infermesh.cli", "features", "ingest", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    for flag in ("--url", "--ca", "--cert", "--key"):
        assert flag in result.stdout
