"""The Prometheus alerting rules: valid, unit-tested with promtool, and naming only metrics the
runner exports."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.observability import RULE_TESTS, RULES, exported_names

promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package prometheus; .ci/run installs it)",
)


@promtool
def test_rules_are_valid() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


@promtool
def test_rules_fire_when_they_should() -> None:
    out = subprocess.run(["promtool", "test", "rules", RULE_TESTS.name], capture_output=True,
                         text=True, timeout=60, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_name_exported_metrics_and_the_four_alerts() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "BackfillStalled", "BackfillFailed", "BackfillErrorRateHigh", "BackfillThrottledTooLong",
    }
    exported = exported_names()
    for rule in rules:
        names = set(re.findall(r"\bbackfill_[a-z_]+", rule["expr"]))
        assert names and names <= exported, rule["alert"]
