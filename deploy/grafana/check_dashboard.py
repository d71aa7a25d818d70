"""Static check of the Grafana dashboard and the Prometheus alert rules: every metric a PromQL
expression names (panel targets, template queries, alert and recording rules) must be one the gateway
or the loop worker really exports.

The exported names come from the code, not from a list: a gateway built in-process (`gateway.app.
create_app` over a mock vLLM on a throwaway SQLite database) is scraped through `/metrics`, and a
`evalsuite.metrics.LoopMetrics` registry has every setter called. tests/test_grafana_dashboard.py
uses the same functions against a gateway served on a real port.

    .venv/bin/python deploy/grafana/check_dashboard.py     # exit 1 and a list of problems if any
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "tunegate.json"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
# Series Prometheus itself writes for every scrape target.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"})

FUNCTIONS = frozenset(
    """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min count_over_time
    day_of_month day_of_week day_of_year days_in_month delta deriv exp floor histogram_count histogram_fraction
    histogram_quantile histogram_sum holt_winters hour idelta increase irate label_join label_replace last_over_time
    ln log10 log2 max_over_time min_over_time minute month predict_linear present_over_time quantile_over_time rate
    resets round scalar sgn sort sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time time timestamp
    vector year acos acosh asin asinh atan atanh cos cosh deg pi rad sin sinh tan tanh label_values query_result
    metrics""".split()
)
AGGREGATIONS = frozenset("sum min max avg group stddev stdvar count count_values bottomk topk quantile".split())
KEYWORDS = frozenset("by without on ignoring group_left group_right bool and or unless offset inf nan".split())
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana query such as `label_values(m, l)`) selects."""
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    text = _STRING.sub(" ", expr)
    text = _VARIABLE.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    if m := re.fullmatch(r"\s*label_values\s*\(\s*([a-zA-Z_:][\w:]*)\s*,.*\)\s*", text, re.S):
        return names | {m.group(1)}
    if re.fullmatch(r"\s*label_values\s*\(.*\)\s*", text, re.S):  # label_values(label): no metric
        return names
    for name, call in _IDENT.findall(text):
        if call or name in FUNCTIONS or name in AGGREGATIONS or name in KEYWORDS:
            continue
        names.add(name)
    return names


def _panels(panels: Iterable[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and template query."""
    found = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            if query:
                found.append((f"variable {var['name']!r}", query))
    return found


def rule_exprs(rules_dir: Path = RULES_DIR) -> list[tuple[str, str]]:
    """(where, expression) of every alert and recording rule in the rules files (not the test files)."""
    import yaml

    found = []
    for path in sorted(rules_dir.glob("*.yml")):
        if path.name.endswith(".test.yml"):
            continue
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            for rule in group.get("rules", []):
                found.append((f"{path.name} {rule.get('alert') or rule.get('record')}", str(rule["expr"])))
    return found


def exposed_names(exposition: str) -> set[str]:
    """Every series name a text exposition offers, samples or not (a labelled family without children
    still has its HELP and TYPE): counters `_total`/`_created`, histograms `_bucket`/`_sum`/`_count`."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def worker_exposition() -> str:
    """The loop worker's registry with every setter called once (so every family has samples)."""
    from prometheus_client import generate_latest

    from evalsuite.metrics import LoopMetrics

    m = LoopMetrics()
    for gauge in (m.quality, m.flag_rate, m.override_rate, m.error_rate):
        gauge.labels("support", "v1").set(0.5)
    m.set_drift("support", 0.6, True, 0.1)
    m.set_agreement("support", 0.9)
    m.set_canary("support", "v2", 0.1)
    m.canary_rolled_back("support", "v3")
    m.set_review_budget_left("support", 10)
    m.set_adapter_status("support", "v1", "active")
    m.job_finished("loop.pass", "ok")
    return generate_latest(m.registry).decode()


def gateway_exposition_in_process() -> str:
    """`/metrics` of a gateway built in this process over a mock vLLM and a throwaway SQLite database."""
    import httpx
    from fastapi.testclient import TestClient

    from core.db import upgrade
    from core.settings import load_settings
    from gateway.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'tunegate.db'}"
        upgrade(url)
        settings = load_settings(
            None,
            var_dir=Path(tmp),
            database={"url": url},
            vllm={"url": "http://vllm.test"},
            guardrails={"enabled": False},
            gateway={"background_tasks": False, "metrics_public": True},
        )
        transport = httpx.MockTransport(lambda request: httpx.Response(503))
        with TestClient(create_app(settings, transport=transport)) as client:
            resp = client.get("/metrics")
            resp.raise_for_status()
            return resp.text


def problems(exported: set[str], dashboard_path: Path = DASHBOARD, rules_dir: Path = RULES_DIR) -> list[str]:
    """What is wrong with the dashboard and rules against these exported names; empty when all is well."""
    out = []
    known = exported | SYNTHETIC
    dashboard = json.loads(dashboard_path.read_text())
    ids = [p.get("id") for p in _panels(dashboard.get("panels", []))]
    if len(ids) != len(set(ids)):
        out.append(f"{dashboard_path.name}: panel ids are not unique")
    for panel in _panels(dashboard.get("panels", [])):
        if panel.get("type") != "row" and not any(t.get("expr") for t in panel.get("targets", [])):
            out.append(f"{dashboard_path.name}: panel {panel.get('title')!r} has no query")
    exprs = [(f"{dashboard_path.name} {w}", e) for w, e in dashboard_exprs(dashboard)] + rule_exprs(rules_dir)
    if not exprs:
        out.append("no expressions found")
    for where, expr in exprs:
        names = promql_metric_names(expr)
        if not names:
            out.append(f"{where}: names no metric: {expr}")
        for name in sorted(names - known):
            out.append(f"{where}: {name} is not exported by the gateway or the worker")
    return out


def main() -> int:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import logging

    logging.disable(logging.WARNING)  # the gateway's start-up chatter
    try:
        exported = exposed_names(gateway_exposition_in_process()) | exposed_names(worker_exposition())
    finally:
        logging.disable(logging.NOTSET)
    found = problems(exported)
    for line in found:
        print(line, file=sys.stderr)
    n_dash = len(dashboard_exprs(json.loads(DASHBOARD.read_text())))
    print(f"dashboard: {n_dash} queries, rules: {len(rule_exprs())} expressions, "
          f"{len(exported)} exported series names: {'FAILED' if found else 'ok'}")  # fmt: skip
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
