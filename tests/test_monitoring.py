"""The alerting rules and the Grafana dashboard: checked by promtool and against the metrics the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from edge_agent.metrics import STAGES, Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "configs" / "alerts.yaml"
ALERTS_TEST = ROOT / "configs" / "alerts.test.yaml"
DASHBOARD = ROOT / "configs" / "grafana-dashboard.json"

EXPECTED_ALERTS = {
    "EdgeAgentDown",
    "EdgeAgentNotReady",
    "EdgeAgentBrokerDisconnected",
    "EdgeAgentOutboxBacklog",
    "EdgeAgentSpoolLow",
    "EdgeAgentInstancesRefused",
    "EdgeAgentDecodeFailures",
    "EdgeAgentEngineDown",
    "EdgeAgentSlowFindings",
    "EdgeAgentWorkerCrashes",
    "EdgeAgentFindingsRejected",
    "EdgeAgentHousekeepingErrors",
    "EdgeAgentStreamConfigMismatch",
    "EdgeAgentModelDrift",
}
# Labels Prometheus adds at scrape time; every other label must be one the daemon sets.
TARGET_LABELS = {"job", "instance"}
# Annotations may name these and nothing else: no label can carry patient data, but say so here too.
ANNOTATION_LABELS = {"job", "instance", "model", "outcome", "reason", "step", "setting", "signal"}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}
METRIC_REF = re.compile(r"\bedge_agent_\w+")
SELECTOR = re.compile(r"\b(edge_agent_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
# Grafana's variables, replaced by values that keep the PromQL valid for promtool.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def promtool() -> str:
    path = shutil.which("promtool") or shutil.which("/usr/bin/promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False)


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the daemon can export -> the label names it carries (le included on buckets)."""
    metrics = Metrics()
    labels_by_family: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            # prometheus_client keeps the label names only in this attribute; collect() shows none
            # until a child exists.
            labels_by_family[value._name] = set(value._labelnames)
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for suffix in SAMPLE_SUFFIXES[family.type]:
            labels = set(labels_by_family.get(family.name, set()))
            if suffix == "_bucket":
                labels.add("le")
            if family.type == "info":
                labels |= {"version", "backend"}
            names[family.name + suffix] = labels
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def load_alerts() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return data


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_alerts()["groups"] for rule in group["rules"]]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    dashboard = load_dashboard()
    exprs: list[tuple[str, str]] = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    return exprs


def metric_problems(where: str, expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Names, label names and stage values in ``expr`` that the daemon does not export."""
    problems = [f"{where}: no metric {name}" for name in METRIC_REF.findall(expr) if name not in exported]
    for name, matchers in SELECTOR.findall(expr):
        for label, op, value in MATCHER.findall(matchers):
            if name in exported and label not in exported[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label}")
            if label == "stage" and op in ("=", "!=") and value not in STAGES:
                problems.append(f"{where}: no stage {value!r}")
    return problems


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_make_at_least_four_alerts_fire() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    silent = {case["alertname"] for test in tests for case in test["alert_rule_test"] if not case.get("exp_alerts")}
    assert len(fired) >= 4, fired
    assert silent == EXPECTED_ALERTS, EXPECTED_ALERTS - silent


def test_rules_are_complete_and_carry_no_peer_data() -> None:
    groups = load_alerts()["groups"]
    assert [group["name"] for group in groups] == ["edge-agent"]
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
        for text in rule["annotations"].values():
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert used <= ANNOTATION_LABELS, (rule["alert"], used - ANNOTATION_LABELS)


def test_alert_exprs_use_only_exported_metrics() -> None:
    exported = exported_metrics()
    problems = [p for rule in alert_rules() for p in metric_problems(rule["alert"], rule["expr"], exported)]
    assert not problems, problems
    # Only EdgeAgentDown watches Prometheus' own `up`; every other rule watches what the daemon exports.
    blind = [rule["alert"] for rule in alert_rules() if not METRIC_REF.search(rule["expr"])]
    assert blind == ["EdgeAgentDown"], blind


def test_dashboard_exprs_use_only_exported_metrics() -> None:
    exported = exported_metrics()
    exprs = dashboard_exprs()
    problems = [p for where, expr in exprs for p in metric_problems(where, expr, exported)]
    assert not problems, problems
    missing = [where for where, expr in exprs if not METRIC_REF.search(expr)]
    assert not missing, missing


def test_metric_check_catches_a_wrong_name_label_and_stage() -> None:
    exported = exported_metrics()
    assert metric_problems("t", 'rate(edge_agent_instances_total{outcome="stored"}[5m])', exported) == []
    assert metric_problems("t", "edge_agent_instances", exported) == ["t: no metric edge_agent_instances"]
    assert metric_problems("t", 'edge_agent_ready{model="x"}', exported) == ["t: edge_agent_ready has no label model"]
    assert metric_problems("t", 'edge_agent_stage_duration_seconds_count{stage="e2e"}', exported) == [
        "t: no stage 'e2e'"
    ]


def test_dashboard_exprs_parse(tmp_path: Path) -> None:
    """promtool parses every panel's PromQL once Grafana's variables are filled in."""
    rules = []
    for i, (_where, expr) in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard_expr_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_importable() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), ids
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    for panel in all_panels(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        for target in panel["targets"]:
            # Every selector follows the instance picker, so one agent can be looked at alone.
            for name, matchers in SELECTOR.findall(target["expr"]):
                assert 'instance=~"$instance"' in matchers, (panel["title"], name)
            assert SELECTOR.search(target["expr"]), (panel["title"], target["expr"])


def test_dashboard_covers_the_operator_views() -> None:
    exprs = " ".join(expr for _where, expr in dashboard_exprs())
    for name in (
        "edge_agent_ready",
        "edge_agent_broker_connected",
        "edge_agent_engine_up",
        "edge_agent_instances_total",
        "edge_agent_findings_total",
        "edge_agent_stage_duration_seconds_bucket",
        "edge_agent_inference_batch_size_sum",
        "edge_agent_queue_depth",
        "edge_agent_outbox_pending",
        "edge_agent_spool_bytes",
        "edge_agent_spool_free_bytes",
        "edge_agent_associations_total",
        "edge_agent_model_drift_psi",
    ):
        assert re.search(rf"\b{name}\b", exprs), name
