"""deploy/grafana/yaie_jax.json: every PromQL query names only metrics a live server exports (or Prometheus's
ALERTS series of the alert rules)."""
from __future__ import annotations

import json
import os
import re

import yaml
from deploy_support import DEPLOY, exported_metric_names, metric_names

DASHBOARD = os.path.join(DEPLOY, "grafana", "yaie_jax.json")


def queries(dashboard: dict):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            yield f"variable {var['name']}", var["query"]


def test_every_query_names_exported_metrics():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    with open(os.path.join(DEPLOY, "prometheus", "alerts.yml")) as f:
        alert_names = {r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]}
    exported = exported_metric_names()
    found = list(queries(dashboard))
    assert len(found) >= 20
    for where, expr in found:
        names = metric_names(expr)
        if re.match(r"\s*ALERTS\{", expr):        # the alert rules' own series
            wanted = set(re.findall(r'alertname=~"([^"]+)"', expr))
            assert wanted and any(re.fullmatch(w, a) for w in wanted for a in alert_names), where
            continue
        assert names, f"{where}: no yaie metric in {expr!r}"
        assert names <= exported, (where, sorted(names - exported))


def test_the_check_can_fail():
    """A query naming a metric the server does not export is caught by the same extraction."""
    assert metric_names('rate(yaie:no_such_metric_total[5m]) + yaie:num_requests_running') - exported_metric_names() \
        == {"yaie:no_such_metric_total"}
