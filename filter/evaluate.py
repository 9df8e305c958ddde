"""Evidence a user can rerun: how often the filter catches what it exists to catch, and
how often it holds back what it should release, measured on sets it builds itself.

From the generator, with distinct seeds:
- a gallery of generator outputs, enrolled as "training images" (as the demo index is);
- near-copies: the gallery's latents plus N(0, sigma^2), for each sigma (what a generator
  that memorised a training image produces);
- augmented copies: gallery images mirrored, cropped, shifted, rotated, brighter or darker,
  recompressed (filter.augment: what a generator trained with those augmentations gives
  back when it memorised a training image), one set per transform;
- a calibration set and a test set of fresh samples (non-members).
Thresholds are calibrated on the calibration set at the target false-reject rate, then
near-copy recall and the test set's false-reject rate are measured at those thresholds.
Images with no detected face are counted apart: the no-face policy decides them, not the
signals.

From real photos (the test faces): a leave-one-out identity set at the default thresholds.
Each photo of a person with other photos is checked against an index of every other photo
(it must be rejected), and each person's photos against an index of everyone else (they
must pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from filter.assembly import detector_manifest, measuring_filter
from filter.augment import PROBE_NAMES, probe_transform, transformed
from filter.calibrate import Calibration, calibrate_thresholds
from filter.decide import DecisionThresholds, ImageEvidence, NoFacePolicy, Reason, decide
from filter.gallery import Enrolment
from filter.identity_filter import FaceEmbeddingPipeline, ImageFaces
from filter.images import decode_image, list_images
from filter.index import FaissIdentityIndex
from filter.replica import frames
from filter.thresholds import resolve_thresholds
from filter.vector_table import Match

Generate = Callable[[np.ndarray], np.ndarray]
LatentFor = Callable[[int, int], np.ndarray]  # (seed, slot) -> latent


@dataclass(frozen=True)
class EvaluationPlan:
    gallery: int = 200
    near_copies: int = 200  # per sigma, drawn from the first gallery latents
    sigmas: tuple[float, ...] = (0.1, 0.2, 0.3)
    calibration: int = 1000
    test: int = 1000
    target_false_reject: float = 0.05
    seed: int = 1000  # gallery seed; the others derive from it, all distinct
    transforms: tuple[str, ...] = PROBE_NAMES  # filter.augment.PROBE_TRANSFORMS
    transformed: int = 200  # per transform, from the first gallery images


@dataclass
class SetScores:
    """Per-image evidence of one set, before thresholds."""

    name: str
    identity: np.ndarray  # max face similarity; NaN for no face or untrusted evidence
    replica: np.ndarray  # NaN when the index has no replica features
    no_face: np.ndarray  # bool
    unusable: np.ndarray  # bool: unsupported geometry or a filter error
    sigma: float | None = None
    transform: str | None = None  # filter.augment probe name

    @property
    def is_copy(self) -> bool:
        """A set of copies of training images (recall), not of non-members (false rejects)."""
        return self.sigma is not None or self.transform is not None

    @property
    def label(self) -> str:
        if self.transform is not None:
            return self.transform
        return f"near-copies, sigma = {self.sigma:g}" if self.sigma is not None else self.name

    @property
    def scored(self) -> np.ndarray:
        return ~self.no_face & ~self.unusable


def score_evidence(
    name: str, evidence: Sequence[ImageEvidence], has_replicas: bool = False
) -> SetScores:
    """Each image's scores, or why it has none. Shared by `facegate calibrate` and
    `facegate evaluate`, so that both count the same images.

    A missing score is never read as a low one. A face without a trusted nearest identity,
    or (when the index has replica features: `has_replicas`, or a replica match present)
    an image without a trusted nearest training image, makes the image unusable, exactly
    as `filter.decide` treats it (a FILTER_ERROR rejection, whatever its faces): it is not
    a calibration sample, where a NaN or a stand-in would move a threshold, it is not
    counted as an image without a face, and it is reported as unusable beside the rates,
    never as a pass. "Trusted" is `Match.found`: an identity and a finite similarity."""
    identity, replica, no_face, unusable = [], [], [], []
    for item in evidence:
        broken = not item.searchable or item.error is not None or item.unsearched_faces > 0
        broken = broken or any(not m.found for m in item.face_matches)
        broken = broken or _replica_missing(item.replica, has_replicas)
        unusable.append(broken)
        no_face.append(not broken and not item.face_matches)
        scores = [m.similarity for m in item.face_matches]
        identity.append(max(scores) if scores and not broken else math.nan)
        replica.append(item.replica.similarity if item.replica is not None else math.nan)
    return SetScores(
        name,
        np.array(identity, dtype=np.float64),
        np.array(replica, dtype=np.float64),
        np.array(no_face, dtype=bool),
        np.array(unusable, dtype=bool),
    )


def _replica_missing(match: Match | None, has_replicas: bool) -> bool:
    if match is None:
        return has_replicas
    return not match.found


def calibrate_on(scores: SetScores, target_false_reject: float, has_replicas: bool) -> Calibration:
    """Thresholds from the scored images of a non-member set (`score_evidence`): unusable
    images are left out, images without a face are counted for the no-face share."""
    mask = scores.scored
    return calibrate_thresholds(
        scores.identity[mask],
        scores.replica[mask] if has_replicas else None,
        target_false_reject,
        int(scores.no_face.sum()),
    )


def rejection_rates(scores: SetScores, thresholds: DecisionThresholds) -> dict[str, float | int]:
    """Shares of the scored images (a face, trusted evidence) each signal rejects."""
    mask = scores.scored
    identity = scores.identity[mask] >= thresholds.identity
    replica = (
        scores.replica[mask] >= thresholds.replica
        if thresholds.replica is not None
        else np.zeros(int(mask.sum()), dtype=bool)
    )
    either = identity | replica
    count = int(mask.sum())
    no_face = scores.no_face
    replica_on_no_face = (
        scores.replica[no_face] >= thresholds.replica
        if thresholds.replica is not None
        else np.zeros(int(no_face.sum()), dtype=bool)
    )
    return {
        "images": len(mask),
        "scored": count,
        "no_face": int(scores.no_face.sum()),
        "no_face_share": float(scores.no_face.mean()) if len(mask) else 0.0,
        "unusable": int(scores.unusable.sum()),
        "rejected": float(either.mean()) if count else math.nan,
        "rejected_identity": float(identity.mean()) if count else math.nan,
        "rejected_replica": float(replica.mean()) if count else math.nan,
        # Scored images that pass, and no-face images the replica signal catches (what
        # FACEGATE_NO_FACE_POLICY=pass would still hold back).
        "passed": int(count - either.sum()),
        "no_face_rejected_replica": int(replica_on_no_face.sum()),
    }


@dataclass
class GeneratedEvaluation:
    calibration: Calibration
    thresholds: DecisionThresholds
    sets: list[SetScores] = field(default_factory=list)

    def lines(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = [
            {
                "set": "calibration",
                "threshold": self.thresholds.identity,
                "replica_threshold": self.thresholds.replica,
                "target_false_reject": self.calibration.target_false_reject,
                "measured_false_reject": self.calibration.measured_false_reject,
                "images": self.calibration.count + self.calibration.no_face,
                "no_face_share": self.calibration.no_face_share,
            }
        ]
        for scores in self.sets:
            rates = rejection_rates(scores, self.thresholds)
            line: dict[str, object] = {"set": scores.name}
            if scores.sigma is not None:
                line["sigma"] = scores.sigma
            if scores.transform is not None:
                line["transform"] = scores.transform
                line["description"] = probe_transform(scores.transform).description
            if scores.is_copy:
                line["recall"] = rates.pop("rejected")
            else:
                line["false_reject"] = rates.pop("rejected")
            line.update(rates)
            out.append(line)
        return out


def evaluate_generated(
    generate: Generate,
    latent_for: LatentFor,
    pipeline: FaceEmbeddingPipeline,
    plan: EvaluationPlan,
    progress: Callable[[int], None] | None = None,
) -> tuple[GeneratedEvaluation, FaissIdentityIndex]:
    """Build the gallery index, the near-copy, calibration and test sets, and score them."""

    def images_for(latents: np.ndarray) -> np.ndarray:
        parts = [generate(latents[i : i + 64]) for i in range(0, len(latents), 64)]
        return np.concatenate(parts)

    def latents(seed: int, count: int) -> np.ndarray:
        return np.stack([latent_for(seed, slot) for slot in range(count)]).astype(np.float32)

    gallery_latents = latents(plan.seed, plan.gallery)
    gallery_images = images_for(gallery_latents)
    enrolment = Enrolment(pipeline)
    for start in range(0, len(gallery_images), 64):
        enrolment.add(
            [
                (f"gallery-{slot:05d}", f"generator:seed={plan.seed}:slot={slot}", image)
                for slot, image in enumerate(gallery_images[start : start + 64], start=start)
            ]
        )
    if progress is not None:
        progress(len(gallery_images))
    index = enrolment.build(detector_settings=detector_manifest(pipeline))
    measuring = measuring_filter(pipeline, index)

    def scored(
        name: str,
        images: np.ndarray | list[np.ndarray],
        sigma: float | None = None,
        transform: str | None = None,
    ) -> SetScores:
        evidence: list[ImageEvidence] = []
        for start in range(0, len(images), 64):
            evidence.extend(measuring.evidence(list(images[start : start + 64])))
            if progress is not None:
                progress(min(64, len(images) - start))
        result = score_evidence(name, evidence, index.has_replicas)
        result.sigma = sigma
        result.transform = transform
        return result

    sets: list[SetScores] = []
    base = gallery_latents[: plan.near_copies]
    for k, sigma in enumerate(plan.sigmas):
        noise = np.random.default_rng(plan.seed + 100 + k).standard_normal(base.shape)
        near = images_for((base + sigma * noise).astype(np.float32))
        sets.append(scored(f"near_copies_sigma_{sigma:g}", near, sigma))
    originals = gallery_images[: plan.transformed]
    for k, name in enumerate(plan.transforms):
        copies = transformed(originals, probe_transform(name), plan.seed + 300 + k)
        sets.append(scored(f"copies_{name}", copies, transform=name))
    calibration_scores = scored("calibration", images_for(latents(plan.seed + 1, plan.calibration)))
    sets.append(scored("fresh_test", images_for(latents(plan.seed + 2, plan.test))))
    calibration = calibrate_on(calibration_scores, plan.target_false_reject, index.has_replicas)
    thresholds = DecisionThresholds(calibration.threshold, calibration.replica_threshold)
    return GeneratedEvaluation(calibration, thresholds, sets), index


@dataclass
class LeaveOneOut:
    enrolled_photos: int = 0
    enrolled_rejected: int = 0
    missed: list[str] = field(default_factory=list)  # enrolled person's photo released
    stranger_photos: int = 0
    strangers_rejected: int = 0
    false_rejects: list[str] = field(default_factory=list)
    thresholds: str = ""
    # Photos the filter rejects for no face or too many faces: neither a match nor a miss.
    unusable: list[str] = field(default_factory=list)

    def lines(self) -> list[dict[str, object]]:
        return [
            {
                "set": "real_photos_enrolled_person",
                "photos": self.enrolled_photos,
                "rejected": self.enrolled_rejected / max(self.enrolled_photos, 1),
                "missed": self.missed,
                "unusable": self.unusable,
                "thresholds": self.thresholds,
            },
            {
                "set": "real_photos_not_enrolled",
                "photos": self.stranger_photos,
                "false_reject": self.strangers_rejected / max(self.stranger_photos, 1),
                "false_rejects": self.false_rejects,
                "thresholds": self.thresholds,
            },
        ]


def evaluate_leave_one_out(identities_dir: Path, pipeline: FaceEmbeddingPipeline) -> LeaveOneOut:
    """Real photos at the default thresholds (no calibration: as a new index starts)."""
    photos: list[tuple[str, Path]] = [
        (folder.name, path)
        for folder in sorted(p for p in Path(identities_dir).iterdir() if p.is_dir())
        for path in list_images(folder)
    ]
    images = [decode_image(path) for _, path in photos]
    embedded: list[ImageFaces] = pipeline.embed_images(images)
    rows = frames(images)
    detector = detector_manifest(pipeline)

    def index_without(excluded: set[int]) -> FaissIdentityIndex:
        enrolment = Enrolment(pipeline)
        keep = [i for i in range(len(photos)) if i not in excluded]
        enrolment.add_embedded(
            [(photos[i][0], str(photos[i][1])) for i in keep],
            [embedded[i] for i in keep],
            rows[keep],
        )
        return enrolment.build(detector_settings=detector)

    def rejected(index: FaissIdentityIndex, i: int) -> tuple[bool | None, str]:
        """True: rejected as a training identity (identity or replica); False: passed;
        None: rejected for another reason (no face, too many faces), which says nothing
        about identity matching."""
        thresholds = resolve_thresholds(index)
        result = embedded[i]
        evidence = ImageEvidence(
            face_matches=index.search(result.embeddings),
            replica=index.search_replicas([images[i]])[0] if index.has_replicas else None,
            searchable=result.searchable,
            unsearched_faces=result.unsearched_faces,
            face_limit=result.face_limit,
        )
        verdict = decide(evidence, thresholds.decision, NoFacePolicy.REJECT)
        if verdict.passed:
            return False, thresholds.describe()
        if verdict.reason in (Reason.IDENTITY_MATCH, Reason.REPLICA):
            return True, thresholds.describe()
        return None, thresholds.describe()

    report = LeaveOneOut()
    by_identity: dict[str, list[int]] = {}
    for i, (identity, _) in enumerate(photos):
        by_identity.setdefault(identity, []).append(i)
    for members in by_identity.values():
        if len(members) > 1:
            for i in members:
                hit, report.thresholds = rejected(index_without({i}), i)
                if hit is None:
                    report.unusable.append(str(photos[i][1]))
                    continue
                report.enrolled_photos += 1
                report.enrolled_rejected += hit
                if not hit:
                    report.missed.append(str(photos[i][1]))
        stranger_index = index_without(set(members))
        for i in members:
            hit, report.thresholds = rejected(stranger_index, i)
            if hit is None:
                if str(photos[i][1]) not in report.unusable:
                    report.unusable.append(str(photos[i][1]))
                continue
            report.stranger_photos += 1
            report.strangers_rejected += hit
            if hit:
                report.false_rejects.append(str(photos[i][1]))
    return report
