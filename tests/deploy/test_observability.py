"""deploy/grafana and deploy/prometheus: the dashboard is a valid Grafana dashboard on a
Prometheus data source variable, the alerts are a valid rule file, every query in either parses as
PromQL and reads only metrics agentless exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml

from worker.metrics import ClusterGauges, Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "agentless.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def _exported() -> dict[str, str]:
    """Every series name a process can export, by the type of its family, read from the real
    registries: a worker's (and the API's) Metrics and the API's ClusterGauges."""
    metrics = Metrics()
    ClusterGauges(metrics.registry)
    return {
        name: family.type
        for family in metrics.registry.collect()
        for name in {family.name, *(sample.name for sample in family.samples)}
    }


EXPORTED = _exported()
# Labelled families export no sample until a label is set: their series are named here by type.
HISTOGRAMS = frozenset(name for name, kind in EXPORTED.items() if kind == "histogram")
COUNTERS = frozenset(f"{name}_total" for name, kind in EXPORTED.items() if kind == "counter")
GAUGES = frozenset(name for name, kind in EXPORTED.items() if kind in ("gauge", "info"))
# prometheus-client's process collector, on every process.
PROCESS_PREFIX = "process_"
RESULTS = frozenset(
    {"succeeded", "succeededWithIssues", "failed", "canceled", "skipped", "abandoned"}
)

# Grafana's variables, as Grafana would expand them, so that a panel's query parses as PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "6h",
    "$namespace": ".*",
}
SEVERITIES = frozenset({"critical", "warning", "info"})
RULE_FIELDS = frozenset({"alert", "expr", "for", "keep_firing_for", "labels", "annotations"})


def is_agentless_metric(name: str) -> bool:
    if name in COUNTERS | GAUGES or name.startswith(PROCESS_PREFIX):
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in ("bucket", "sum", "count") and base in HISTOGRAMS


@cache
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@cache
def alert_file() -> dict[str, Any]:
    loaded = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def rules() -> list[dict[str, Any]]:
    return [rule for group in alert_file()["groups"] for rule in group["rules"]]


def panel_queries() -> Iterator[Any]:
    for panel in panels():
        for target in panel["targets"]:
            yield pytest.param(target["expr"], id=f"{panel['title']}/{target['refId']}")


def alert_queries() -> Iterator[Any]:
    for rule in rules():
        yield pytest.param(rule["expr"], id=rule["alert"])


def expand(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know in {expr}"
    return expr


def nodes(expr: str) -> list[promql_parser.Expr]:
    return _below(promql_parser.parse(expand(expr)))


def metric_names(expr: str) -> set[str]:
    return {
        node.name
        for node in nodes(expr)
        if isinstance(node, promql_parser.VectorSelector) and node.name is not None
    }


def schema(file: str, definition: str | None = None) -> jsonschema.Draft7Validator:
    document = json.loads((SCHEMAS / file).read_text(encoding="utf-8"))
    if definition is not None:
        document["$ref"] = f"#/definitions/{definition}"
    jsonschema.Draft7Validator.check_schema(document)
    return jsonschema.Draft7Validator(document)


def errors(validator: jsonschema.Draft7Validator, value: object) -> list[str]:
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(value)
    ]


# --- the dashboard ---------------------------------------------------------------------------


def test_the_dashboard_is_a_valid_grafana_dashboard() -> None:
    assert errors(schema("grafana-dashboard.json"), dashboard()) == []
    assert 39 <= dashboard()["schemaVersion"] < 42
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_is_valid_for_its_plugin() -> None:
    options = {
        "timeseries": schema("grafana-timeseries.json", "Options"),
        "stat": schema("grafana-stat.json", "Options"),
    }
    custom = {"timeseries": schema("grafana-timeseries.json", "FieldConfig")}
    query = schema("grafana-prometheus-query.json")
    for panel in panels():
        assert panel["type"] in options, panel["title"]
        assert errors(options[panel["type"]], panel["options"]) == [], panel["title"]
        if panel["type"] in custom:
            assert errors(custom[panel["type"]], panel["fieldConfig"]["defaults"]["custom"]) == []
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert errors(query, target) == [], panel["title"]


def test_the_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_every_query_reads_the_prometheus_data_source_variable() -> None:
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["type"] == "datasource"]
    assert (variable["name"], variable["query"]) == ("datasource", "prometheus")
    reference = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels():
        assert panel["datasource"] == reference, panel["title"]
        assert all(t["datasource"] == reference for t in panel["targets"]), panel["title"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == reference


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    shown = {
        name for panel in panels() for t in panel["targets"] for name in metric_names(t["expr"])
    }
    assert {
        "agentless_tasks_completed_total",  # throughput by result
        "agentless_tasks_in_flight",
        "agentless_tasks",  # waiting and polling tasks
        "agentless_oldest_waiting_task_age_seconds",
        "agentless_invocation_duration_seconds_bucket",
        "agentless_dead_letters_total",
        "agentless_workers",  # worker liveness
    } <= shown
    by_result = [t["expr"] for p in panels() for t in p["targets"] if "by (result)" in t["expr"]]
    assert any("agentless_tasks_completed_total" in expr for expr in by_result)


@pytest.mark.parametrize("expr", panel_queries())
def test_every_dashboard_query_parses_and_reads_agentless_metrics(expr: str) -> None:
    names = metric_names(expr)
    assert names
    assert {name for name in names if not is_agentless_metric(name)} == set()


@pytest.mark.parametrize("expr", [*panel_queries(), *alert_queries()])
def test_quantiles_come_from_buckets_summed_by_le(expr: str) -> None:
    for node in nodes(expr):
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            (aggregate,) = [
                n for n in _below(node.args[1]) if isinstance(n, promql_parser.AggregateExpr)
            ]
            assert aggregate.modifier is not None
            assert "le" in aggregate.modifier.labels
            selected = [
                n for n in _below(node.args[1]) if isinstance(n, promql_parser.VectorSelector)
            ]
            assert selected
            assert all(str(n.name).endswith("_bucket") for n in selected)


# --- the alerts ------------------------------------------------------------------------------


def test_the_alert_file_is_a_rule_file() -> None:
    assert set(alert_file()) == {"groups"}
    # The PrometheusRule CRD's schema of the same groups (a rule file is its spec).
    crd = json.loads((SCHEMAS / "monitoring-prometheusrule-v1.json").read_text(encoding="utf-8"))
    spec = jsonschema.Draft7Validator(crd["properties"]["spec"])
    assert errors(spec, alert_file()) == []
    names = [group["name"] for group in alert_file()["groups"]]
    assert len(names) == len(set(names))
    alerts = [rule["alert"] for rule in rules()]
    assert len(alerts) == len(set(alerts))


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: str(rule.get("alert")))
def test_every_alert_says_how_long_how_bad_and_what_to_do(rule: dict[str, Any]) -> None:
    assert set(rule) <= RULE_FIELDS
    assert re.fullmatch(r"Agentless[A-Z][A-Za-z0-9]+", rule["alert"])
    assert promql_parser.parse_duration(rule["for"]) > timedelta(0)
    assert rule["labels"]["severity"] in SEVERITIES
    assert set(rule["annotations"]) >= {"summary", "description"}
    assert all(text.strip() for text in rule["annotations"].values())


@pytest.mark.parametrize("expr", alert_queries())
def test_every_alert_query_parses_and_reads_agentless_metrics(expr: str) -> None:
    names = metric_names(expr)
    assert names
    assert {name for name in names if not is_agentless_metric(name)} == set()
    # Job names are the scrape configuration's to choose: no alert depends on them.
    matchers = [
        m.name
        for node in nodes(expr)
        if isinstance(node, promql_parser.VectorSelector)
        for m in node.matchers.matchers
    ]
    assert "job" not in matchers


@pytest.mark.parametrize("expr", [*panel_queries(), *alert_queries()])
def test_results_are_named_as_agentless_names_them(expr: str) -> None:
    for node in nodes(expr):
        if isinstance(node, promql_parser.VectorSelector):
            for matcher in node.matchers.matchers:
                if matcher.name == "result":
                    assert set(matcher.value.split("|")) <= RESULTS


def test_the_alerts_cover_what_the_issue_asks_for() -> None:
    by_metric = {name: rule for rule in rules() for name in metric_names(rule["expr"])}
    assert {
        "agentless_dead_letters_total",
        "agentless_tasks_overdue",
        "agentless_workers",
        "agentless_callbacks_total",
        "agentless_dependency_up",
    } <= set(by_metric)
    assert 'status=~"5.."' in by_metric["agentless_callbacks_total"]["expr"]
    assert by_metric["agentless_tasks_overdue"]["labels"]["severity"] == "critical"


def test_the_metric_names_check_refuses_others() -> None:
    assert is_agentless_metric("agentless_invocation_duration_seconds_bucket")
    assert is_agentless_metric("process_resident_memory_bytes")
    assert not is_agentless_metric("agentless_tasks_waiting")
    assert not is_agentless_metric("agentless_invocation_duration_seconds")
    assert not is_agentless_metric("agentless_tasks_completed")
    assert metric_names('sum(rate(a_total{x="1"}[$__rate_interval])) / on () b') == {"a_total", "b"}


def _below(expr: promql_parser.Expr) -> list[promql_parser.Expr]:
    found: list[promql_parser.Expr] = []
    promql_parser.walk(expr, found.append)
    return found
