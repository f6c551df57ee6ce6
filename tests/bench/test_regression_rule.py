"""The decision rule of ``make bench-check`` (bench/regression_rule.py): per-round ratios against a baseline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from regression_rule import MIN_RELATIVE_NOISE, RatioSummary, Verdict, failed, judge  # noqa: E402

# A baseline whose rounds spread by 0.10 (half-spread 0.05): the measured noise is 0.05 around a median of 1.00.
BASELINE = RatioSummary.of([0.95, 1.00, 1.05])


def test_a_drop_within_the_baseline_noise_passes() -> None:
    judgement = judge("m", [0.96, 0.97, 0.98], BASELINE)
    assert judgement.verdict is Verdict.PASS
    assert judgement.noise == pytest.approx(0.05)


def test_a_drop_beyond_the_noise_fails() -> None:
    judgement = judge("m", [0.90, 0.92, 0.93], BASELINE)
    assert judgement.verdict is Verdict.FAIL
    assert judgement.floor == pytest.approx(0.95)
    assert failed([judge("ok", [1.0], BASELINE), judgement])


def test_a_noisy_run_widens_its_own_tolerance() -> None:
    # Median 0.90 is 0.10 below the baseline, but this run's rounds spread by 0.40: the drop is inside its noise.
    noisy = judge("m", [0.70, 0.90, 1.10], BASELINE)
    assert noisy.verdict is Verdict.PASS and noisy.noise == pytest.approx(0.20)
    # The same median from steady rounds is a regression.
    assert judge("m", [0.89, 0.90, 0.91], BASELINE).verdict is Verdict.FAIL


def test_without_spread_the_minimum_tolerance_applies() -> None:
    steady = RatioSummary.of([2.0, 2.0, 2.0])
    assert judge("m", [2.0 * (1 - MIN_RELATIVE_NOISE) + 0.001], steady).verdict is Verdict.PASS
    assert judge("m", [2.0 * (1 - MIN_RELATIVE_NOISE) - 0.001], steady).verdict is Verdict.FAIL


def test_a_rise_beyond_the_noise_is_reported_as_improved_not_failed() -> None:
    judgement = judge("m", [1.20, 1.22, 1.25], BASELINE)
    assert judgement.verdict is Verdict.IMPROVED
    assert not failed([judgement])


def test_a_baseline_round_trips_through_json() -> None:
    assert RatioSummary.from_json(BASELINE.to_json()) == BASELINE
    with pytest.raises(ValueError):
        RatioSummary.of([])
