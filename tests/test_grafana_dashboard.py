"""Grafana: deploy/grafana/dashboards/tunegate.json covers traffic, latency, gateway overhead,
guardrail decisions, the review queue, quality and drift per adapter version, the canary and the
adapter timeline; every metric its queries (and the alert rules) name is one a live gateway's
`/metrics` or the loop worker's registry really exports; the provisioning points at it."""

from __future__ import annotations

import importlib.util
import json

import httpx
import pytest
import yaml

from .conftest import REPO
from .test_prometheus import live_gateway

GRAFANA = REPO / "deploy" / "grafana"
_spec = importlib.util.spec_from_file_location("check_dashboard", GRAFANA / "check_dashboard.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)
DASHBOARD = json.loads(check.DASHBOARD.read_text())


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (route, status) (rate(tunegate_requests_total{route=~"$route"}[$__rate_interval]))',
         {"tunegate_requests_total"}),
        ("histogram_quantile(0.95, sum by (route, le) (rate(tunegate_x_seconds_bucket[5m]))) > 10",
         {"tunegate_x_seconds_bucket"}),
        ("(tunegate_canary_weight == -1) unless (tunegate_canary_weight offset 1h == -1)", {"tunegate_canary_weight"}),
        ("max_over_time(a[6h]) - b > 0.1", {"a", "b"}),
        ('time() - max by (kind) (c_seconds) + on(instance) group_left(x) d{l="sum(e)"}', {"c_seconds", "d"}),
        ("label_values(tunegate_requests_total, route)", {"tunegate_requests_total"}),
        ('{__name__="m_total", job="x"}', {"m_total"}),
        ("up == 0", {"up"}),
    ],
)  # fmt: skip
def test_metric_names_are_read_out_of_promql(expr, names):
    assert check.promql_metric_names(expr) == names


def test_a_made_up_metric_is_caught(tmp_path):
    broken = json.loads(json.dumps(DASHBOARD))
    broken["panels"][1]["targets"][0]["expr"] = "rate(tunegate_no_such_thing_total[5m])"
    (tmp_path / "d.json").write_text(json.dumps(broken))
    exported = {"tunegate_requests_total"}
    found = check.problems(exported, tmp_path / "d.json", check.RULES_DIR)
    assert any("tunegate_no_such_thing_total" in line for line in found)


def test_the_dashboard_covers_what_the_issue_asks():
    titles = " | ".join(p["title"].lower() for p in check._panels(DASHBOARD["panels"]))
    for topic in ("requests / s", "latency", "gateway overhead", "guardrail decisions", "review queue", "quality",
                  "drift", "canary", "adapter timeline", "flag rate", "error rate"):  # fmt: skip
        assert topic in titles, topic
    per_version = [t for p in check._panels(DASHBOARD["panels"]) for t in p.get("targets", [])
                   if t["expr"].startswith(("tunegate_quality", "tunegate_flag_rate", "tunegate_drift"))]  # fmt: skip
    assert len(per_version) >= 3 and all("{{adapter_version}}" in t["legendFormat"] or "drift" in t["expr"]
                                         for t in per_version)  # fmt: skip
    timeline = [p for p in check._panels(DASHBOARD["panels"]) if p["type"] == "state-timeline"]
    assert timeline and "tunegate_adapter_status" in timeline[0]["targets"][0]["expr"]


def test_every_query_and_alert_names_a_metric_a_live_gateway_or_the_worker_exports(tmp_path):
    with live_gateway(tmp_path) as gateway:
        scraped = httpx.get(f"{gateway.url}/metrics", timeout=10)
        assert scraped.status_code == 200
        gateway_names = check.exposed_names(scraped.text)
    worker_names = check.exposed_names(check.worker_exposition())
    assert "tunegate_requests_total" in gateway_names and "tunegate_traffic_log_dead_letters_total" in gateway_names
    assert "tunegate_quality" in worker_names and "tunegate_loop_jobs_total" in worker_names
    assert check.problems(gateway_names | worker_names) == []
    used = {n for _, e in check.dashboard_exprs(DASHBOARD) + check.rule_exprs() for n in check.promql_metric_names(e)}
    assert "tunegate_gateway_overhead_seconds_bucket" in used and "tunegate_adapter_status" in used


def test_provisioning_points_at_the_dashboard_and_prometheus():
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tunegate.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]
    assert DASHBOARD["uid"] == "tunegate"
    for panel in check._panels(DASHBOARD["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_static_check_passes():
    assert check.main() == 0
