"""The decision rule of ``make bench-check``: is a ratio's drop against the baseline beyond the noise?

Pure functions over numbers (no servers, no files), so ``tests/bench/test_regression_rule.py`` checks the rule
itself. A metric is a ratio measured once per round (ours/Triton of perf_analyzer infer/s, Wrapper/server-alone
patches/s); a run has several interleaved rounds, the baseline keeps the rounds it was built from.

The rule, for each metric:

- the baseline holds the rounds of several runs of the same code, pooled (``bench_check.py --build-baseline``):
  its lowest and highest round are how far that code was seen to move on this machine;
- ``low noise`` = baseline median - baseline min, ``high noise`` = baseline max - baseline median, each at least
  ``MIN_RELATIVE_NOISE`` of the baseline median;
- FAIL when this run's median ratio is below ``baseline median - low noise``: the middle of this run is below
  every round measured for the baseline (or 5 % below its median when those agreed within 5 %);
- IMPROVED when it is above ``baseline median + high noise`` (rebuild the baseline with the new runs);
- PASS otherwise.

Why the baseline's extremes and not this run's spread: rounds of one run agree with each other far more than
with a run ten minutes later (the neighbours' load shifts between runs more than within one), so a run can be
tight and still off; only rounds pooled over runs show the noise a later run will meet.
"""

from __future__ import annotations

import enum
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# The least tolerance: 5 % of the baseline median, whatever the rounds' spread.
MIN_RELATIVE_NOISE = 0.05


class Verdict(enum.Enum):
    PASS = "pass"
    FAIL = "FAIL"
    IMPROVED = "improved"


@dataclass(frozen=True)
class RatioSummary:
    """A metric's per-round ratios reduced to what the rule uses."""

    median: float
    minimum: float
    maximum: float
    rounds: tuple[float, ...]

    @classmethod
    def of(cls, rounds: Sequence[float]) -> "RatioSummary":
        if not rounds:
            raise ValueError("a ratio needs at least one round")
        values = tuple(float(value) for value in rounds)
        return cls(statistics.median(values), min(values), max(values), values)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.minimum, "max": self.maximum, "rounds": list(self.rounds)}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "RatioSummary":
        rounds = document.get("rounds") or [document["median"]]
        summary = cls.of(rounds)
        return cls(float(document["median"]), float(document["min"]), float(document["max"]), summary.rounds)


@dataclass(frozen=True)
class Judgement:
    metric: str
    verdict: Verdict
    current: RatioSummary
    baseline: RatioSummary
    noise: float

    @property
    def floor(self) -> float:
        return self.baseline.median - self.noise


def noise_below(baseline: RatioSummary) -> float:
    return max(baseline.median - baseline.minimum, MIN_RELATIVE_NOISE * baseline.median)


def noise_above(baseline: RatioSummary) -> float:
    return max(baseline.maximum - baseline.median, MIN_RELATIVE_NOISE * baseline.median)


def judge(metric: str, rounds: Sequence[float], baseline: RatioSummary) -> Judgement:
    """The verdict on one metric's per-round ratios against its baseline (the rule in the module docstring)."""
    current = RatioSummary.of(rounds)
    noise = noise_below(baseline)
    if current.median < baseline.median - noise:
        verdict = Verdict.FAIL
    elif current.median > baseline.median + noise_above(baseline):
        verdict = Verdict.IMPROVED
    else:
        verdict = Verdict.PASS
    return Judgement(metric, verdict, current, baseline, noise)


def failed(judgements: Sequence[Judgement]) -> bool:
    return any(judgement.verdict is Verdict.FAIL for judgement in judgements)
