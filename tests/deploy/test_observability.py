"""deploy/prometheus and deploy/grafana, statically: every query parses, recording rules are named after the
labels they keep, the SLO alerts are multiwindow multi-burn-rate, the dashboards are complete.

(That every metric they use exists on the services' /metrics is tests/e2e/test_deploy_metrics.py.)
"""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import promql_parser
import pytest
import yaml

from tests.deploy.artifacts import DEPLOY
from tests.deploy.promql import (
    DASHBOARDS,
    PROMETHEUS_SYNTHETIC,
    all_queries,
    parse,
    recorded,
    rule_groups,
    selectors,
)

DURATION = re.compile(r"^\d+[smhdwy]$")
STATUS_CODES = {code.name for code in grpc.StatusCode}
JOBS = {job["job_name"] for job in yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"]}


def test_every_query_parses() -> None:
    queries = all_queries()
    assert len(queries) > 80
    for query in queries:
        try:
            parse(query.expr)
        except ValueError as error:
            pytest.fail(f"{query.where}: {error}\n{query.expr}")


def test_a_broken_query_does_not_parse() -> None:
    with pytest.raises(ValueError):
        parse("sum by (model) (rate(infermesh_requests_total[5m])")


def test_rules_are_well_formed() -> None:
    names = set()
    for file, rule in rule_groups():
        assert ("record" in rule) != ("alert" in rule), f"{file}: {rule}"
        if "alert" in rule:
            assert rule["alert"] not in names, f"duplicate alert {rule['alert']}"
            names.add(rule["alert"])
            assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            assert DURATION.match(rule.get("for", "0s")), rule["alert"]
        for text in rule.get("annotations", {}).values():
            assert text.count("{{") == text.count("}}"), f"{rule.get('alert')}: unbalanced template"


def test_recorded_series_are_defined_before_use() -> None:
    defined = recorded()
    for query in all_queries():
        for selector in selectors(query.expr):
            if ":" in selector.name:
                assert selector.name in defined, f"{query.where} uses undefined recording rule {selector.name}"


def output_labels(node: Any, defined: dict[str, str]) -> frozenset[str] | None:
    """Labels a recording rule's result keeps (None: every label of the input series)."""
    if isinstance(node, promql_parser.AggregateExpr):
        if node.modifier is None:
            return frozenset()
        if str(node.modifier.type).endswith("By"):
            return frozenset(node.modifier.labels)
        return None
    if isinstance(node, promql_parser.Call):
        if node.func.name == "histogram_quantile":
            inner = output_labels(node.args[1], defined)
            return None if inner is None else inner - {"le"}
        return output_labels(node.args[0], defined)
    if isinstance(node, promql_parser.ParenExpr):
        return output_labels(node.expr, defined)
    if isinstance(node, promql_parser.BinaryExpr):
        left = output_labels(node.lhs, defined)
        return output_labels(node.rhs, defined) if isinstance(node.lhs, promql_parser.NumberLiteral) else left
    if isinstance(node, promql_parser.VectorSelector):
        return level_labels(node.name) if node.name in defined else None
    if isinstance(node, promql_parser.NumberLiteral):
        return frozenset()
    raise AssertionError(f"unexpected node {type(node).__name__}")


def level_labels(name: str) -> frozenset[str]:
    """`level:metric:operations` (Prometheus naming convention): the level names the labels kept."""
    level = name.split(":")[0]
    return frozenset() if level == "slo" else frozenset(level.split("_"))


def test_recording_rules_keep_the_labels_their_names_say() -> None:
    defined = recorded()
    for name, expr in defined.items():
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), f"{name}: level:metric:operations"
        kept = output_labels(parse(expr), defined)
        assert kept == level_labels(name), f"{name} keeps {sorted(kept or [])}"
    for query in all_queries():
        for selector in selectors(query.expr):
            if selector.name in defined:
                for label, _, _ in selector.matchers:
                    assert label in level_labels(selector.name), f"{query.where}: {selector.name} has no '{label}'"


def test_per_model_percentiles_and_error_ratio_are_recorded() -> None:
    defined = recorded()
    for quantile in ("p50", "p95", "p99"):
        assert f"service_model:infermesh_request_duration_seconds:{quantile}_5m" in defined
        assert f"model:infermesh_feature_fetch_seconds:{quantile}_5m" in defined
        assert f"model:infermesh_queue_wait_seconds:{quantile}_5m" in defined
        assert f"model_device:infermesh_forward_seconds:{quantile}_5m" in defined
    assert "service_model:infermesh_request_errors:ratio_rate5m" in defined


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for _, rule in rule_groups() if "alert" in rule}


@pytest.mark.parametrize(
    ("slo", "sli", "budget"),
    [
        ("availability", "slo:infermesh_availability:error_ratio_rate", 0.001),
        ("latency", "slo:infermesh_latency:slow_ratio_rate", 0.05),
    ],
)
def test_slo_alerts_are_multiwindow_multi_burn_rate(slo: str, sli: str, budget: float) -> None:
    """Google SRE workbook: page at 14.4x (1h & 5m) or 6x (6h & 30m), ticket at 3x (1d & 2h) or 1x (3d & 6h)."""
    expected = {
        "page": {("1h", 14.4), ("5m", 14.4), ("6h", 6.0), ("30m", 6.0)},
        "ticket": {("1d", 3.0), ("2h", 3.0), ("3d", 1.0), ("6h", 1.0)},
    }
    found: dict[str, set[tuple[str, float]]] = {}
    for rule in alerts().values():
        if rule["labels"].get("slo") != slo:
            continue
        pairs = re.findall(rf"{re.escape(sli)}(\w+) > \(([\d.]+) \* ([\d.]+)\)", rule["expr"])
        assert pairs and all(float(b) == budget for _, _, b in pairs), rule["alert"]
        found.setdefault(rule["labels"]["severity"], set()).update((w, float(f)) for w, f, _ in pairs)
        assert " and " in rule["expr"] and " or " in rule["expr"], f"{rule['alert']}: long AND short windows"
    assert found == expected
    defined = recorded()
    for window, _ in expected["page"] | expected["ticket"]:
        assert f"{sli}{window}" in defined
        assert f"[{window}]" in defined[f"{sli}{window}"], f"{sli}{window} must compute over {window}"


def test_latency_slo_threshold_is_a_histogram_bucket() -> None:
    from infermesh.metrics import LATENCY_BUCKETS

    for name, expr in recorded().items():
        for bound in re.findall(r'le="([^"]+)"', expr):
            assert float(bound) in LATENCY_BUCKETS, f"{name}: le={bound} is not a bucket boundary"


def test_operational_alerts_exist() -> None:
    rules = alerts()
    covered = {
        "queue depth": "infermesh_queue_depth",
        "feature staleness": "view:infermesh_feature_stale:ratio_rate5m",
        "replica down": "up{",
        "no model replica": "infermesh_replicas_up",
        "rollbacks": "infermesh_rollbacks_total",
        "shadow divergence": "infermesh_shadow_divergence",
        "feature drift": "infermesh_feature_drift_psi",
        "prediction drift": "infermesh_prediction_drift_psi",
        "prediction log drops": "infermesh_prediction_log_dropped_total",
        "online accuracy (M4)": "infermesh_online_accuracy",
        "cold-start rate (M8)": "infermesh_cold_requests_total",
        "first-request latency": "infermesh_cold_start_first_request_seconds",
    }
    for what, needle in covered.items():
        assert any(needle in rule["expr"] for rule in rules.values()), f"no alert on {what}"


def test_cold_start_alert_is_the_share_of_model_calls_over_the_m8_target() -> None:
    (rule,) = [rule for rule in alerts().values() if "infermesh_cold_requests_total" in rule["expr"]]
    assert 'infermesh_requests_total{service="model_service", method="ModelInfer"}' in rule["expr"]
    assert rule["expr"].rstrip().endswith("> 0.01"), "M8: under 1 % of requests hit cold instances"


def test_drift_alerts_use_the_standard_psi_bands() -> None:
    rules = alerts()
    for metric in ("infermesh_feature_drift_psi", "infermesh_prediction_drift_psi"):
        bands = {rule["labels"]["severity"]: rule["expr"] for rule in rules.values() if metric in rule["expr"]}
        assert bands["ticket"].endswith("> 0.1") and bands["page"].endswith("> 0.25"), bands


def test_every_alert_links_its_runbook_section() -> None:
    runbooks = (DEPLOY.parent / "docs" / "runbooks.md").read_text()
    sections = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].lower()).replace(" ", "-")
        for line in runbooks.splitlines()
        if line.startswith("## ")
    }
    assert {section.split("-")[0] for section in sections} == {f"f{i}" for i in range(1, 8)}, "F1-F7"
    for name, rule in alerts().items():
        url = rule["annotations"].get("runbook_url", "")
        assert url.rpartition("#")[0].endswith("docs/runbooks.md"), f"{name}: runbook_url {url!r}"
        assert url.rpartition("#")[2] in sections, f"{name}: no section {url.rpartition('#')[2]!r}"


def test_label_values_in_matchers_are_real() -> None:
    """`code` values are gRPC status names; `job` values are scrape jobs (both compose and Kubernetes)."""
    for query in all_queries():
        for selector in selectors(query.expr):
            for label, op, value in selector.matchers:
                values = value.split("|") if op in ("=~", "!~") else [value]
                if label == "code":
                    assert set(values) <= STATUS_CODES, f"{query.where}: {values}"
                if label == "job":
                    assert set(values) <= JOBS, f"{query.where}: {values}"
            if selector.name in PROMETHEUS_SYNTHETIC:
                assert any(label == "job" for label, _, _ in selector.matchers), f"{query.where}: scope `up` by job"


def load(name: str) -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / name).read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_dashboards_are_provisioned_with_their_datasource() -> None:
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/infermesh.yml").read_text())["datasources"]
    uids = {source["uid"]: source for source in sources}
    assert uids["prometheus"]["url"] == "http://prometheus:9090" and uids["prometheus"]["type"] == "prometheus"
    assert uids["jaeger"]["url"] == "http://jaeger:16686"
    assert {path.name for path in DASHBOARDS} == {
        "infermesh-executive.json",
        "infermesh-oncall.json",
        "infermesh-debug.json",
    }
    seen_uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] == path.stem and dashboard["uid"] not in seen_uids
        seen_uids.add(dashboard["uid"])
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels(dashboard):
            assert panel["datasource"]["uid"] in uids, f"{path.name} '{panel['title']}'"
            assert panel["targets"], f"{path.name} '{panel['title']}' has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] in uids
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name} '{panel['title']}' is wider than the grid"


def queries_of(dashboard: dict[str, Any]) -> str:
    return "\n".join(target["expr"] for panel in panels(dashboard) for target in panel["targets"])


def test_executive_dashboard() -> None:
    text = queries_of(load("infermesh-executive.json"))
    assert "slo:infermesh_availability:error_ratio_rate" in text, "availability"
    assert "slo:infermesh_availability:error_ratio_rate1h / 0.001" in text, "availability burn rate"
    assert "slo:infermesh_latency:slow_ratio_rate1h / 0.05" in text, "latency burn rate"
    for quantile in ("p50", "p95", "p99"):
        assert f"infermesh_request_duration_seconds:{quantile}_5m" in text
    assert 'service_model:infermesh_requests:rate5m{service="gateway"' in text, "traffic"


def test_oncall_dashboard() -> None:
    dashboard = load("infermesh-oncall.json")
    text = queries_of(dashboard)
    assert "p95_5m" in text, "latency"
    assert "sum by (service, code)" in text and 'code!="OK"' in text, "errors by code"
    assert "infermesh_inflight_requests" in text, "in-flight"
    assert "infermesh_replicas_up" in text and "up{job=" in text, "replicas"
    assert "infermesh_model_loaded" in text and "process_start_time_seconds" in text, "model versions, deploys"
    for rollout in ("infermesh_traffic_requests_total", "infermesh_guard_error_ratio", "infermesh_rollbacks_total"):
        assert rollout in text, f"the rollouts row lacks {rollout}"
    annotations = [a for a in dashboard["annotations"]["list"] if "expr" in a]
    assert any("process_start_time_seconds" in a["expr"] for a in annotations), "deploy markers on every graph"


def test_debug_dashboard() -> None:
    dashboard = load("infermesh-debug.json")
    text = queries_of(dashboard)
    for stage in ("infermesh_feature_fetch_seconds", "infermesh_queue_wait_seconds", "infermesh_forward_seconds"):
        assert stage in text, f"latency breakdown lacks {stage}"
    assert "infermesh_batch_size_bucket" in text and "infermesh_batch_size_sum" in text, "batch sizes"
    assert "view:infermesh_feature_stale:ratio_rate5m" in text, "feature staleness"
    for quality in ("infermesh_feature_drift_psi", "infermesh_prediction_drift_psi", "infermesh_prediction_log"):
        assert quality in text, f"model quality lacks {quality}"
    online = ("infermesh_online_accuracy", "infermesh_online_auc", "infermesh_online_brier_score")
    for quality in (*online, "infermesh_online_labels", "infermesh_label_delay_seconds_bucket"):
        assert quality in text, f"online accuracy lacks {quality}"
    for cold in ("infermesh_cold_requests_total", "infermesh_cold_start_first_request_seconds"):
        assert cold in text, f"cold starts lack {cold}"
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model" and variable["multi"] is False, "debug looks at one model"
