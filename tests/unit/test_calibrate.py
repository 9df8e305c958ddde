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
