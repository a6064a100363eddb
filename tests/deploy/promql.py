"""Every PromQL expression the deployment ships (rules, dashboards, HPA adapter), parsed with promql-parser.

Used by the static tests (syntax, recording-rule names, label conventions) and by the end-to-end test that
checks each metric name against what the running services expose on /metrics.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import promql_parser
import yaml

from tests.deploy.artifacts import DEPLOY, K8S

RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"

# Grafana's variables, replaced by values of the right type so the query parses as Prometheus would get it.
_GRAFANA_VARIABLES = [
    (re.compile(r"\$__rate_interval|\$__interval|\$\{__rate_interval\}|\$\{__interval\}"), "1m"),
    (re.compile(r"\$\{?model\}?"), "fraud"),
]
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\)$")
# Series Prometheus itself adds for every target; not /metrics of our services.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@dataclass(frozen=True)
class Query:
    where: str  # file and position, for failure messages
    expr: str  # as Prometheus receives it (variables substituted)


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value), op in = != =~ !~


def parse(expr: str) -> Any:
    return promql_parser.parse(expr)


def selectors(expr: str) -> list[Selector]:
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple((m.name, _op(m.op), m.value) for m in node.matchers.matchers if m.name != "__name__")
            name = node.name or next(m.value for m in node.matchers.matchers if m.name == "__name__")
            found.append(Selector(name, matchers))

    promql_parser.walk(parse(expr), visit)
    return found


def _op(op: Any) -> str:
    return {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}[str(op).rsplit(".", 1)[-1]]


def rule_groups() -> list[tuple[str, dict[str, Any]]]:
    """(file name, rule) for every rule in deploy/prometheus/rules."""
    rules = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend((path.name, rule) for rule in group["rules"])
    return rules


def recorded() -> dict[str, str]:
    """Recording rule name → its expression."""
    return {rule["record"]: rule["expr"] for _, rule in rule_groups() if "record" in rule}


def grafana(expr: str) -> str:
    for pattern, value in _GRAFANA_VARIABLES:
        expr = pattern.sub(value, expr)
    return expr


def dashboard_queries(path: Any) -> list[Query]:
    dashboard = json.loads(path.read_text())
    queries = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            queries.append(Query(f"{path.name} panel '{panel['title']}' {target['refId']}", grafana(target["expr"])))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append(Query(f"{path.name} annotation '{annotation['name']}'", grafana(annotation["expr"])))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"{path.name} variable {variable['name']}: only label_values(selector, label) is used"
            queries.append(Query(f"{path.name} variable '{variable['name']}'", match["selector"]))
    return queries


def adapter_queries() -> list[Query]:
    """The Prometheus Adapter rules with its template placeholders filled in, as the adapter sends them."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    queries = []
    for index, rule in enumerate(values["rules"]["custom"]):
        where = f"{ADAPTER_VALUES.name} rule {index}"
        series = selectors(rule["seriesQuery"])
        assert len(series) == 1, where
        filled = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series[0].name)
            .replace("<<.LabelMatchers>>", 'namespace="infermesh",pod=~"model-service-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
        queries += [Query(where + " seriesQuery", rule["seriesQuery"]), Query(where + " metricsQuery", filled)]
    return queries


@functools.cache
def all_queries() -> tuple[Query, ...]:
    queries = [Query(f"{name} {rule.get('record') or rule.get('alert')}", rule["expr"]) for name, rule in rule_groups()]
    for path in DASHBOARDS:
        queries += dashboard_queries(path)
    queries += adapter_queries()
    return tuple(queries)


def raw_selectors() -> list[tuple[Query, Selector]]:
    """Selectors of series scraped from the services (not recording-rule outputs, not Prometheus' own)."""
    names = recorded()
    return [
        (query, selector)
        for query in all_queries()
        for selector in selectors(query.expr)
        if selector.name not in names and selector.name not in PROMETHEUS_SYNTHETIC
    ]
