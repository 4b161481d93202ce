"""deploy/prometheus/alerts.yml: valid (`promtool check rules`), each alert fires when its condition holds and only
then (`promtool test rules` on alerts_test.yml, Debian package `prometheus`), and every metric it names is one a
live server exports."""
from __future__ import annotations

import os
import subprocess

import yaml
from deploy_support import DEPLOY, exported_metric_names, metric_names, require_tool

RULES = os.path.join(DEPLOY, "prometheus", "alerts.yml")
EXPECTED_ALERTS = {"YaieDeviceMemoryHigh", "YaieRequestLatencyHigh", "YaieErrorRateHigh", "YaieQueueBacklog",
                   "YaieEngineStalled", "YaieEngineDown"}


def promtool(*args) -> subprocess.CompletedProcess:
    exe = require_tool("promtool", "`apt-get install -y prometheus` (Debian package prometheus)")
    return subprocess.run([exe, *args], cwd=os.path.dirname(RULES), capture_output=True, text=True, timeout=120)


def rules():
    with open(RULES) as f:
        return [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules():
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


def test_promtool_unit_tests_pass():
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_every_alert_is_unit_tested_and_names_exported_metrics():
    with open(os.path.join(DEPLOY, "prometheus", "alerts_test.yml")) as f:
        tested = {t["alertname"] for case in yaml.safe_load(f)["tests"] for t in case["alert_rule_test"]}
    alerts = {r["alert"] for r in rules()}
    assert alerts == EXPECTED_ALERTS and tested == alerts
    exported = exported_metric_names()
    for r in rules():
        names = metric_names(r["expr"])
        assert names and names <= exported, (r["alert"], names - exported)
