"""The alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``, alerts_test.yaml):
each alert fires on the series that should raise it, with its labels and annotations, and stays quiet otherwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from services.local_platform.prometheus import ALERT_RULES

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: run 'make prometheus' (make test does)")
    return found


def test_rules_file_is_valid(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_rules_unit_tests_pass(promtool: str) -> None:
    result = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=HERE, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_fail_when_a_rule_changes(promtool: str, tmp_path: Path) -> None:
    """The unit tests pin the thresholds: a looser failing-steps rule no longer raises the expected alert."""
    rules = tmp_path / "charts" / "eo-inference-platform" / "files" / "prometheus-alerts.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text(ALERT_RULES.read_text().replace("> 0.5", "> 0.9"))
    tests = tmp_path / "tests" / "observability" / "alerts_test.yaml"
    tests.parent.mkdir(parents=True)
    shutil.copy(HERE / "alerts_test.yaml", tests)
    result = subprocess.run([promtool, "test", "rules", tests.name], cwd=tests.parent, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "EomlStepsFailing" in result.stdout + result.stderr
