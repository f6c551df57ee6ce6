"""The static RVQ prior: per-level index frequencies fitted on training codes, carried as text on the model card."""

from __future__ import annotations

import numpy as np
import pytest

from services.core.rvq_prior import ALPHABET, LEVELS, ResidualVqPrior, RvqPriorError, fit_rvq_prior, is_rvq_prior_text


def training_codes(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.minimum(rng.exponential(50.0, size=(4, 60, 60, LEVELS)).astype(np.int64), 9999)
    codes[0, :, :, 6:] = -1  # some positions use fewer levels
    return codes


def test_counts_are_the_training_histogram_per_level() -> None:
    codes = training_codes()
    prior = fit_rvq_prior(codes, source="unit test")
    for level in range(LEVELS):
        expected = np.bincount(codes[..., level].reshape(-1) + 1, minlength=ALPHABET)
        np.testing.assert_array_equal(prior.counts[level], expected)
    assert prior.counts[6, 0] == 3600  # -1 is symbol 0


def test_text_round_trip_keeps_counts_and_names_the_prior_by_its_sha256() -> None:
    prior = fit_rvq_prior(training_codes(), source="unit test")
    text = prior.to_text()
    assert is_rvq_prior_text(text) and not is_rvq_prior_text("laplace-context/1:abc")
    again = ResidualVqPrior.from_text(text)
    np.testing.assert_array_equal(again.counts, prior.counts)
    assert again.source == "unit test" and again.sha256 == prior.sha256
    assert fit_rvq_prior(training_codes(seed=1)).sha256 != prior.sha256


def test_unseen_indices_stay_codable_and_frequent_ones_are_cheap() -> None:
    prior = fit_rvq_prior(training_codes())
    probabilities = prior.probabilities(0)
    assert probabilities.shape == (ALPHABET,) and (probabilities > 0).all()
    assert probabilities.sum() == pytest.approx(1.0)
    frequent, unseen = np.array([1]), np.array([9999 + 1])
    assert prior.ideal_bits(frequent, 0) < 8 < prior.ideal_bits(unseen, 0)


@pytest.mark.parametrize("text", ["laplace-context/1:abc", "rvq-level-frequencies/1:not base64!",
                                  "rvq-level-frequencies/1:eJwDAAAAAAE="])
def test_unreadable_priors_are_refused(text: str) -> None:
    with pytest.raises(RvqPriorError):
        ResidualVqPrior.from_text(text)


def test_training_codes_out_of_range_are_refused() -> None:
    with pytest.raises(RvqPriorError, match="training codes"):
        fit_rvq_prior(np.full((1, 60, 60, LEVELS), 10000, dtype=np.int64))
