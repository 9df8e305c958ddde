"""Threshold calibration on images known not to be in the training set.

With N indexed identities the chance that an unrelated face clears the threshold
against at least one of them compounds (about 1 - (1 - FAR)^N), so a threshold
picked from pairwise statistics rejects far more fresh faces than expected once
the gallery is large. Calibrating on each non-member image's maximum similarity to
the whole index measures that directly: the (1 - target) quantile of those maxima
is the threshold at which the target share of non-members is falsely rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


@dataclass(frozen=True)
class Calibration:
    threshold: float
    target_false_reject: float
    count: int
    no_face: int
    quantiles: dict[str, float]
    mean: float
    max: float

    def as_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "target_false_reject": self.target_false_reject,
            "count": self.count,
            "no_face": self.no_face,
            "quantiles": self.quantiles,
            "mean": self.mean,
            "max": self.max,
        }


def calibrate_threshold(
    max_similarities: np.ndarray, target_false_reject: float, no_face: int = 0
) -> Calibration:
    """Threshold = the (1 - target) quantile of non-members' max similarity to the index.

    A face matches at similarity >= threshold, so the threshold sits just above the
    quantile: exactly `target` of the calibration set (or fewer) would be rejected.
    """
    if not 0.0 < target_false_reject < 1.0:
        raise ValueError("target false-reject rate must be between 0 and 1")
    values = np.asarray(max_similarities, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no faces found in the non-member set; nothing to calibrate on")
    quantile = float(np.quantile(values, 1.0 - target_false_reject, method="higher"))
    threshold = float(np.nextafter(np.float32(quantile), np.float32(np.inf)))
    return Calibration(
        threshold=round(threshold, 6) if round(threshold, 6) > quantile else threshold,
        target_false_reject=target_false_reject,
        count=int(values.size),
        no_face=no_face,
        quantiles={f"p{q * 100:g}": float(np.quantile(values, q)) for q in QUANTILES},
        mean=float(values.mean()),
        max=float(values.max()),
    )
