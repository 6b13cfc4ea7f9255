"""The alert rules in Prometheus's own rule engine: promtool's unit tests (deploy/prometheus-rules.test.yml)
fire each alert on the series it is meant for, after its `for` and not before; the HPA's metric (the
prometheus-adapter rule) is evaluated there too, and is the queueing alert's expression. test_deploy.py
checks the same expressions' selectors against a running server's series."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import ROOT

RULES = ROOT / "deploy" / "prometheus-rules.yml"


def _promtool() -> str:
    installed = Path(sys.executable).parent / "promtool"  # `make test` puts it beside the venv's python
    found = str(installed) if installed.exists() else shutil.which("promtool")
    assert found, "promtool is missing: `make promtool` installs it"
    return found


def _promtool_test(tests: Path) -> None:
    # fewer garbage collections, on one core (the other worker's): a fifth less CPU, 250 MB instead of 120
    environment = {**os.environ, "GOGC": "400", "GOMAXPROCS": "1"}
    done = subprocess.run([_promtool(), "test", "rules", str(tests)], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def _alerts() -> dict[str, str]:
    rules = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def _hpa_query() -> str:
    """The prometheus-adapter rule's metricsQuery, still a template (<<.GroupBy>>, <<.LabelMatchers>>)."""
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "prometheus-adapter.yaml").read_text())["data"]["config.yaml"]
    (rule,) = yaml.safe_load(config)["rules"]
    return rule["metricsQuery"]


def test_every_alert_fires_on_its_case_and_not_on_the_healthy_one():
    _promtool_test(ROOT / "deploy" / "prometheus-rules.test.yml")


def test_the_queueing_alert_is_the_hpa_metric_over_all_replicas():
    """One definition: the adapter's query with no grouping, no pod matchers and a 5m window is the alert's."""
    over_all = _hpa_query().replace("by (<<.GroupBy>>) ", "").replace(", <<.GroupBy>>", "").replace(",<<.LabelMatchers>>", "")
    expected = over_all.replace("[1m]", "[5m]") + " > 5000"
    assert " ".join(_alerts()["CtTriageQueueing"].split()) == " ".join(expected.split())


def test_the_hpa_metric_is_the_queue_time_of_a_study_and_small_for_a_feed_of_refusals(tmp_path):
    """The adapter's query as it fills it for three pods, in promtool: refused studies only (each
    queued 0.1 ms at ct_preprocess, none reaching the ensembles' successes) read 0.1 ms, not a saturated
    pod; 3 s at ct_preprocess with explained studies waiting 5 s at ct_explain read 8 s; an idle pod 0."""
    query = _hpa_query().replace("<<.GroupBy>>", "pod")
    query = query.replace("<<.LabelMatchers>>", 'namespace="default",pod=~"ct-triage-a|ct-triage-b|ct-triage-c"')
    per_minute = {  # pod: {model: (queue us, successes, failures)} added each minute
        "ct-triage-a": {  # 60 refused studies: each a ct_preprocess success, two ct_triage failures
            "ct_preprocess": (6_000, 60, 0),
            "ct_classifier": (0, 0, 0),
            "ct_explain": (0, 0, 0),
            "ct_triage": (0, 0, 120),
        },
        "ct-triage-b": {  # 60 studies and 6 explained ones
            "ct_preprocess": (198_000_000, 66, 0),
            "ct_classifier": (1_200_000, 60, 0),
            "ct_explain": (30_000_000, 6, 0),
            "ct_triage": (0, 60, 0),
            "ct_triage_explain": (0, 6, 0),
        },
        "ct-triage-c": {"ct_preprocess": (0, 0, 0), "ct_classifier": (0, 0, 0), "ct_explain": (0, 0, 0), "ct_triage": (0, 0, 0)},
    }
    series = []
    for pod, models in per_minute.items():
        for model, (queue_us, successes, failures) in models.items():
            labels = f'model="{model}", namespace="default", pod="{pod}"'
            for name, step in (("queue_duration_us", queue_us), ("request_success", successes)):
                series.append({"series": f"nv_inference_{name}{{{labels}}}", "values": f"0+{step}x10"})
            series.append({"series": f'nv_inference_request_failure{{reason="OTHER", {labels}}}', "values": f"0+{failures}x10"})
    expected = {"ct-triage-a": 0.1, "ct-triage-b": 3000 + 5000, "ct-triage-c": 0}
    case = {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            {
                "expr": query,
                "eval_time": "10m",
                "exp_samples": [{"labels": f'{{pod="{pod}"}}', "value": value} for pod, value in expected.items()],
            }
        ],
    }
    tests = tmp_path / "hpa-metric.test.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": [case]}))
    _promtool_test(tests)


def test_every_scrape_of_the_deployment_carries_the_label_the_down_alert_selects():
    """CtTriageDown selects Triton's targets by one label: compose's scrape config must set it, and on
    Kubernetes it is the pod label the kubernetes-pods job's labelmap (a PodMonitor's podTargetLabels)
    copies, its name sanitised. Without it the alert's absent() fires for a healthy deployment."""
    (label, value), *_ = re.findall(r'up\{(\w+)="([^"]*)"\}', _alerts()["CtTriageDown"])
    (job,) = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    assert all(target.get("labels", {}).get(label) == value for target in job["static_configs"]), job
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["metadata"]["labels"]
    assert {re.sub(r"[^a-zA-Z0-9_]", "_", name): text for name, text in pod.items()}.get(label) == value, pod


def test_the_down_alert_gives_a_new_target_the_start_up_allowance_of_both_setups():
    """Triton opens its metrics port only once its models are loaded and warmed up (minutes on a GPU): a
    target that has not answered yet is down only after as long as the Kubernetes start-up probe and
    compose's healthcheck give a start, so that no rollout or scale-up pages anyone."""
    windows = {int(minutes) * 60 for minutes in re.findall(r"(?:\[|offset )(\d+)m\b", _alerts()["CtTriageDown"])}
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    probe = container["startupProbe"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["triton"]["healthcheck"]["start_period"]
    assert windows == {probe["periodSeconds"] * probe["failureThreshold"]} == {int(compose.removesuffix("s"))}


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    cases = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.test.yml").read_text())["tests"]
    tested = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    assert tested == alerts
