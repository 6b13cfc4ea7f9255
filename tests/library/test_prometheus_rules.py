"""The alert rules in Prometheus's own rule engine: promtool's unit tests (deploy/prometheus-rules.test.yml)
fire each alert on the series it is meant for, after its `for` and not before. test_deploy.py
checks the same expressions' selectors against a running server's series."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def _promtool() -> str:
    installed = Path(sys.executable).parent / "promtool"  # `make test` puts it beside the venv's python
    found = str(installed) if installed.exists() else shutil.which("promtool")
    assert found, "promtool is missing: `make promtool` installs it"
    return found


def test_every_alert_fires_on_its_case_and_not_on_the_healthy_one():
    tests = ROOT / "deploy" / "prometheus-rules.test.yml"
    done = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_has_a_unit_test():
    import yaml

    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    cases = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.test.yml").read_text())["tests"]
    tested = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    assert tested == alerts
