"""DET curves of an evaluation (filter.evaluate): false rejects on fresh non-members
against copies missed, per signal and for the two combined, with the recall of each set of
copies at the calibrated thresholds in the legend (`facegate evaluate --det PNG`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from filter.evaluate import GeneratedEvaluation, SetScores, rejection_rates


def det_points(
    member_scores: np.ndarray, non_member_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(false-reject rate on non-members, miss rate on members) for every threshold."""
    members = np.sort(member_scores[np.isfinite(member_scores)])
    non_members = np.sort(non_member_scores[np.isfinite(non_member_scores)])
    thresholds = np.unique(np.concatenate([members, non_members, [np.inf]]))
    false_reject = 1.0 - np.searchsorted(non_members, thresholds, side="left") / len(non_members)
    miss = np.searchsorted(members, thresholds, side="left") / len(members)
    return false_reject, miss


def combined_scores(scores: SetScores, reference: SetScores) -> np.ndarray:
    """One score for both signals: each signal's rank among the non-member reference set,
    the higher of the two (the union rule calibration uses)."""

    def rank(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
        ref = np.sort(ref[np.isfinite(ref)])
        return np.searchsorted(ref, values, side="right") / max(len(ref), 1)

    mask = reference.scored
    identity = rank(scores.identity, reference.identity[mask])
    replica = rank(scores.replica, reference.replica[mask])
    return np.where(np.isfinite(scores.replica), np.maximum(identity, replica), identity)


def draw_det(evaluation: GeneratedEvaluation, out: Path) -> list[str]:
    """DET curves: one panel per near-copy sigma (identity, replica, and both combined),
    and one panel of the augmented copies (both combined, one curve per transform). Every
    legend entry of a set of copies carries its recall at the calibrated thresholds.
    Returns the legend entries, panel by panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    near = [s for s in evaluation.sets if s.sigma is not None]
    augmented = [s for s in evaluation.sets if s.transform is not None]
    test = next(s for s in evaluation.sets if not s.is_copy)
    panels = len(near) + (1 if augmented else 0)
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.6), squeeze=False)
    t = test.scored
    test_rates = rejection_rates(test, evaluation.thresholds)
    operating_x = max(float(test_rates["rejected"]), 1e-4)

    def curve(
        axis: Any,
        label: str,
        member_scores: np.ndarray,
        non_member_scores: np.ndarray,
        **style: Any,
    ) -> None:
        if not np.isfinite(member_scores).any():
            return
        false_reject, miss = det_points(member_scores, non_member_scores)
        floor = 0.5 / max(len(member_scores), 1)
        axis.plot(np.maximum(false_reject, 1e-4), np.maximum(miss, floor), label=label, **style)

    def recall_of(members: SetScores) -> float:
        return float(rejection_rates(members, evaluation.thresholds)["rejected"])

    for axis, members in zip(axes[0], near, strict=False):
        m = members.scored
        curves = {
            "identity": (members.identity[m], test.identity[t]),
            "replica": (members.replica[m], test.replica[t]),
            "identity OR replica": (
                combined_scores(members, test)[m],
                combined_scores(test, test)[t],
            ),
        }
        for label, (member_scores, non_member_scores) in curves.items():
            curve(axis, label, member_scores, non_member_scores, linewidth=1.6)
        recall = recall_of(members)
        axis.scatter(
            [operating_x],
            [max(1.0 - recall, 0.5 / max(int(m.sum()), 1))],
            color="black",
            zorder=5,
            label=f"calibrated operating point: recall {recall:.3f}",
        )
        _det_axes(axis, evaluation, f"near-copies, sigma = {members.sigma:g}")
    if augmented:
        axis = axes[0][-1]
        reference = combined_scores(test, test)[t]
        for members in augmented:
            m = members.scored
            curve(
                axis,
                f"{members.transform}: recall {recall_of(members):.3f}",
                combined_scores(members, test)[m],
                reference,
                linewidth=1.2,
            )
        axis.axvline(operating_x, color="black", linestyle="--", linewidth=0.8)
        _det_axes(axis, evaluation, "augmented copies of training images (identity OR replica)")
    legends = [
        text.get_text()
        for axis in axes[0]
        if axis.get_legend() is not None
        for text in axis.get_legend().get_texts()
    ]
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return legends


def _det_axes(axis: Any, evaluation: GeneratedEvaluation, title: str) -> None:
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlim(1e-3, 1.0)
    axis.set_ylim(1e-3, 1.0)
    axis.axvline(evaluation.calibration.target_false_reject, color="grey", linestyle=":")
    axis.set_xlabel("false rejects (fresh non-members rejected)")
    axis.set_ylabel("misses (copies released)")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, loc="lower left")
