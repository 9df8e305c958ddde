"""Joint calibration of the identity and replica thresholds, without models."""

import numpy as np
import pytest

from filter.calibrate import calibrate_thresholds


def test_joint_thresholds_reject_at_most_the_target_by_either_signal() -> None:
    rng = np.random.default_rng(0)
    identity = rng.normal(0.30, 0.10, 1000)
    replica = rng.normal(0.20, 0.10, 1000)
    calibration = calibrate_thresholds(identity, replica, 0.05)
    assert calibration.replica_threshold is not None
    rejected = (identity >= calibration.threshold) | (replica >= calibration.replica_threshold)
    assert 0.04 <= rejected.mean() <= 0.05
    assert calibration.measured_false_reject == pytest.approx(rejected.mean())
    # The budget is spent on both signals, not all on one.
    assert (identity >= calibration.threshold).any() and (
        replica >= calibration.replica_threshold
    ).any()


def test_the_threshold_is_a_quantile_not_the_highest_score() -> None:
    scores = np.linspace(0.0, 0.9, 20)
    calibration = calibrate_thresholds(scores, None, 0.05)
    assert int((scores >= calibration.threshold).sum()) == 1  # exactly the budget
    assert calibration.threshold <= 0.9


def test_too_few_non_members_are_refused() -> None:
    with pytest.raises(ValueError, match="too few"):
        calibrate_thresholds(np.full(19, 0.2), None, 0.05)


def test_with_two_signals_a_small_set_needs_a_budget_for_each() -> None:
    """With 20-39 faces the budget was 1, and when the two signals' top scores belonged
    to two images no rank fitted: both thresholds landed above the highest score, and
    rejected nothing, silently."""
    rng = np.random.default_rng(1)
    identity, replica = rng.normal(0.3, 0.05, 39), rng.normal(0.3, 0.05, 39)
    identity[0], replica[1] = 0.95, 0.97  # two different images, one outlier each
    with pytest.raises(ValueError, match=r"39 non-member faces are too few.*two different"):
        calibrate_thresholds(identity, replica, 0.05)
    replica[0] = 0.99  # both top scores one image: one rank of each is one image
    assert calibrate_thresholds(identity, replica, 0.05).threshold < 0.95
    identity, replica = rng.normal(0.3, 0.05, 40), rng.normal(0.3, 0.05, 40)
    identity[0], replica[1] = 0.95, 0.97
    calibration = calibrate_thresholds(identity, replica, 0.05)
    assert calibration.replica_threshold is not None
    assert calibration.threshold < 0.95 and calibration.replica_threshold < 0.97
    assert calibrate_thresholds(identity[:20], None, 0.05).threshold < 0.95  # one signal


def test_enrolled_images_among_the_non_members_are_named_not_calibrated_above_one() -> None:
    """15 of 200 scoring 1.0 (enrolled photos in the non-member folder) gave a threshold of
    1.0000001: it rejects nothing, and saving it failed with a traceback."""
    scores = np.random.default_rng(2).normal(0.3, 0.05, 200)
    scores[:15] = 1.0
    with pytest.raises(ValueError, match=r"above any similarity.*are enrolled"):
        calibrate_thresholds(scores, None, 0.05)
    scores[:15] = 0.8  # tied below 1: a threshold just above them (ties pass), measured
    calibration = calibrate_thresholds(scores, None, 0.05)
    assert 0.8 < calibration.threshold < 0.81 and calibration.measured_false_reject == 0.0
