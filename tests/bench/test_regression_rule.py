"""The decision rule of ``make bench-check`` (bench/regression_rule.py): per-round ratios against a baseline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from regression_rule import MIN_RELATIVE_NOISE, RatioSummary, Verdict, failed, judge  # noqa: E402

# A baseline pooled from runs whose rounds went from 0.80 to 1.10 around a median of 1.00.
BASELINE = RatioSummary.of([0.80, 0.95, 1.00, 1.00, 1.05, 1.10])


def test_a_median_within_the_baselines_rounds_passes() -> None:
    judgement = judge("m", [0.82, 0.85, 0.90], BASELINE)
    assert judgement.verdict is Verdict.PASS
    assert judgement.floor == pytest.approx(0.80)


def test_a_median_below_every_baseline_round_fails() -> None:
    judgement = judge("m", [0.70, 0.78, 0.95], BASELINE)
    assert judgement.verdict is Verdict.FAIL
    assert failed([judge("ok", [1.0], BASELINE), judgement])


def test_one_low_round_does_not_fail_a_run() -> None:
    # A neighbour's burst collapses one round; the median still sits inside the baseline's rounds.
    assert judge("m", [0.40, 0.97, 1.02], BASELINE).verdict is Verdict.PASS


def test_a_tight_run_is_judged_by_the_baselines_spread_not_its_own() -> None:
    # Three rounds agreeing on 0.81 are no evidence of a drop: the same code measured 0.80 before.
    assert judge("m", [0.81, 0.81, 0.81], BASELINE).verdict is Verdict.PASS


def test_a_tight_baseline_still_allows_the_minimum_tolerance() -> None:
    steady = RatioSummary.of([2.0, 2.0, 2.0])
    assert judge("m", [2.0 * (1 - MIN_RELATIVE_NOISE) + 0.001], steady).verdict is Verdict.PASS
    assert judge("m", [2.0 * (1 - MIN_RELATIVE_NOISE) - 0.001], steady).verdict is Verdict.FAIL


def test_a_rise_above_every_baseline_round_is_improved_not_failed() -> None:
    judgement = judge("m", [1.15, 1.20, 1.25], BASELINE)
    assert judgement.verdict is Verdict.IMPROVED
    assert not failed([judgement])
    assert judge("m", [1.05, 1.08, 1.09], BASELINE).verdict is Verdict.PASS


def test_a_baseline_round_trips_through_json() -> None:
    assert RatioSummary.from_json(BASELINE.to_json()) == BASELINE
    with pytest.raises(ValueError):
        RatioSummary.of([])
