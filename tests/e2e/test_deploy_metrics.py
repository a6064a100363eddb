"""Every metric the shipped rules, dashboards and HPA adapter query is one the running services expose.

Scrapes /metrics of each process of the session mesh after one inference, then checks each selector in
deploy/prometheus/rules, deploy/grafana/dashboards and deploy/k8s/prometheus-adapter against it: the
metric name exists, every label it matches on exists on that metric, and `service`/`method` equality
matchers name values the services really report (so `service="model-service"` would fail).
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict

import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from demo.mesh import LocalMesh
from infermesh import metrics
from tests.deploy.promql import raw_selectors
from tests.e2e.meshes import auth, fraud_inputs

# Labels Prometheus attaches to every scraped series (target labels), see deploy/prometheus/*.yml.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "node"}
# Families of these types expose their samples under suffixed names.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}
CHECKED_VALUES = ("service", "method")


def declared_labels() -> dict[str, set[str]]:
    """Label names infermesh/metrics.py declares, per sample name: for families with no sample yet."""
    declared: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in SUFFIXES[metric._type]:
                extra = {"le"} if suffix == "_bucket" else set()
                declared[metric._name + suffix] = set(metric._labelnames) | extra
    return declared


@pytest.fixture(scope="module")
def exposed(mesh: LocalMesh) -> dict[str, dict[str, set[str]]]:
    """Sample name → label → values seen, over every process of the mesh (after one fraud inference)."""
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    client.infer("fraud", fraud_inputs(["u42"], ["m7"], [12.5]), headers=auth(), client_timeout=10.0)
    client.close()

    samples: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for process in mesh.processes():
        assert process.metrics_port > 0, f"{process.name} serves no /metrics"
        with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            # A labelled family with no child yet still declares its series names.
            for suffix in SUFFIXES.get(family.type, ("",)):
                samples[family.name + suffix]  # creates the entry
            for sample in family.samples:
                for label, value in sample.labels.items():
                    samples[sample.name][label].add(value)
    return samples


def test_every_queried_metric_is_exposed(exposed: dict[str, dict[str, set[str]]]) -> None:
    checked = raw_selectors()
    assert len(checked) > 50, "the rules and dashboards lost their queries"
    missing = sorted(
        {f"{selector.name} (in {query.where})" for query, selector in checked if selector.name not in exposed}
    )
    assert not missing, "queried but no service exposes it:\n" + "\n".join(missing)


def test_matched_labels_exist_on_their_metric(exposed: dict[str, dict[str, set[str]]]) -> None:
    problems = []
    declared = declared_labels()
    for query, selector in raw_selectors():
        labels = exposed.get(selector.name, {})
        for label, op, value in selector.matchers:
            if label in TARGET_LABELS:
                continue
            if label not in labels and label not in declared.get(selector.name, set()):
                problems.append(f"{selector.name} has no label '{label}' ({query.where})")
            elif op == "=" and label in CHECKED_VALUES and value not in labels[label]:
                problems.append(
                    f'{selector.name}{{{label}="{value}"}}: services report {sorted(labels[label])} ({query.where})'
                )
    assert not problems, "\n".join(sorted(set(problems)))
