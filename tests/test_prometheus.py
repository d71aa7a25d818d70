"""Prometheus: deploy/prometheus's config and alert rules pass `promtool check config|rules` and their
unit tests (`promtool test rules`), and a real Prometheus (Debian's package, installed by
deploy/scripts/ensure-services.sh) loads those rules, scrapes a running gateway and reads one of its
metrics back through its HTTP API. A missing `prometheus`/`promtool` skips here, fails in CI."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from core.db import upgrade
from core.io import free_port
from gateway.app import create_app

from .conftest import REPO, ServerThread, skip_or_fail
from .test_routing_db import FakeVllm, add_adapter, app_key, chat, settings_for

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules" / "tunegate.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "rules" / "tunegate.rules.test.yml"
ALERTS = {
    "TunegateGatewayDown", "TunegateVllmDown", "TunegateHighErrorRate", "TunegateHighLatency",
    "TunegateGatewayOverheadHigh", "TunegateTrafficLogDeadLetters", "TunegateReviewBacklog", "TunegateWorkerDown",
    "TunegateHighFlagRate", "TunegateQualityLow", "TunegateQualityDrop", "TunegateAdapterErrorRate",
    "TunegateInputDrift", "TunegateCanaryRolledBack", "TunegateReviewBudgetExhausted", "TunegateLoopJobsFailing",
}  # fmt: skip


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"`{name}` is not installed (Debian's `prometheus` package; deploy/scripts/ensure-services.sh)")
    return path


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    done = subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@contextlib.contextmanager
def live_gateway(tmp_path: Path, requests: int = 3) -> Iterator[ServerThread]:
    """A gateway on a real port over a fake vLLM (SQLite), route `support` -> v1, after `requests` chats."""
    url = f"sqlite:///{tmp_path / 'tunegate.db'}"
    upgrade(url)
    settings = settings_for(tmp_path, url, {"support": {"targets": [{"adapter": "support", "version": "v1"}]}})
    from core.db import make_engine, session_factory

    engine = make_engine(url)
    sessions = session_factory(engine)
    add_adapter(sessions, "support", 1)
    key = app_key(sessions)
    engine.dispose()
    with ServerThread(create_app(settings, transport=httpx.MockTransport(FakeVllm()))) as server:
        headers = {"Authorization": f"Bearer {key}"}
        for i in range(requests):
            resp = httpx.post(f"{server.url}/v1/chat/completions", json=chat("support", f"u{i}"), headers=headers)
            assert resp.status_code == 200, resp.text
        yield server


# --- promtool -------------------------------------------------------------------------------------


def test_promtool_checks_the_config_and_rules():
    assert "SUCCESS" in promtool("check", "config", str(CONFIG))
    out = promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(ALERTS)} rules found" in out, out


def test_the_rules_carry_every_alert_the_issue_names():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS


def test_promtool_rule_unit_tests_pass():
    assert "SUCCESS" in promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)


def test_every_alert_is_unit_tested_both_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires, quiet = set(), set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == ALERTS and quiet == ALERTS


def test_the_compose_config_scrapes_the_gateway_and_the_worker():
    config = yaml.safe_load(CONFIG.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"tunegate-gateway": ["gateway:8000"], "tunegate-worker": ["worker:9100"]}
    assert config["rule_files"] == ["rules/tunegate.rules.yml"]


# --- a real Prometheus ----------------------------------------------------------------------------


def test_prometheus_scrapes_a_running_gateway(tmp_path):
    binary = tool("prometheus")
    with live_gateway(tmp_path / "gw") as gateway:
        # The deployed config with the gateway's real address, a 1 s interval and the real rules file.
        config = yaml.safe_load(CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES)]
        config["scrape_configs"] = [
            {**job, "static_configs": [{"targets": [f"127.0.0.1:{gateway.port}"]}]}
            for job in config["scrape_configs"]
            if job["job_name"] == "tunegate-gateway"
        ]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        api = f"http://127.0.0.1:{port}/api/v1"
        log = (tmp_path / "prometheus.log").open("w")
        prometheus = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline, result = time.monotonic() + 60, []
            while time.monotonic() < deadline and prometheus.poll() is None:
                with contextlib.suppress(httpx.HTTPError, ValueError):  # 503 text until ready
                    body = httpx.get(f"{api}/query", params={"query": "tunegate_requests_total"}, timeout=5).json()
                    if result := body["data"]["result"]:
                        break
                time.sleep(0.5)
            assert result, (tmp_path / "prometheus.log").read_text()[-3000:]
            sample = result[0]
            assert sample["metric"]["job"] == "tunegate-gateway"
            assert sample["metric"]["route"] == "support" and sample["metric"]["status"] == "200"
            assert float(sample["value"][1]) == 3
            # The deployed rules loaded and evaluate without errors against the live series.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                if rules and all(
                    r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown" for r in rules
                ):
                    break
                time.sleep(0.5)
            assert {r["name"] for r in rules} == ALERTS
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        finally:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
            log.close()
