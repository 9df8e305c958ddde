"""The filter on a GPU: agreement with the CPU, and throughput.

    python -m bench.gpu_bench [--sections agreement,default,facenet] [--out FILE]
    python -m bench.gpu_bench --smoke          # tiny sizes on the CPU: checks the script
    python -m bench.gpu_bench --batch-sweep    # only the filter's faces/s by batch size

Sections (JSON lines on stdout, and in `--out`, by default
`bench/results/gpu-<card>-<date>.jsonl`):
- `agreement`: the default configuration (SFace, batched MTCNN, built through
  `build_embedding_pipeline`, so with the CUDA numerics policy) on the GPU against the
  CPU, on generated faces (the served path, demo index of 200 identities built on
  the CPU) at two thresholds and on the test photos (full path, an index of id01-id03):
  verdict flips (near / far from a threshold), face counts, embedding cosine min and
  percentiles; the same with TF32 allowed, to show what the policy buys; and batch
  invariance on the GPU (each image alone against a batch of `--batch`).
- `default`: the default configuration's throughput: detection alone, SFace (the torch
  port) alone, and the whole filter against a 100k-vector index searched on the device,
  with 1 and 2 batches in flight, its stage seconds and its fraction of the embedder alone.
- `facenet`: InceptionResnetV1 at fp32 and bf16 alone, their agreement, and the whole
  filter with it (a state dict the script writes itself in the published format: random
  values, the same compute as the VGGFace2 weights).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import MODELS, REPO, device_name, generated_faces
from filter.agreement import FilterRun, compare_runs, run_filter
from filter.assembly import build_embedding_pipeline, detector_manifest, load_index_for
from filter.decide import DecisionThresholds, NoFacePolicy
from filter.detection_policy import filter_for_generator
from filter.embedders import FacenetEmbedder
from filter.faces import GENERATED_FAST_PATH, FaceAligner, MtcnnDetector
from filter.fast_path_mode import FastPathMode
from filter.gallery import build_gallery_index
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter, StageTimes
from filter.images import decode_image
from filter.index import FaissIdentityIndex
from filter.numerics import apply_device_numerics
from filter.overlap import overlapped
from service.demo import build_demo_index
from service.generators import DcganGenerator, load_dcgan_digiface, to_uint8_images

NEAR_THRESHOLD = 0.01
# Generated faces are judged at the default identity threshold and at the demo's calibrated
# ones (README "The threshold"); photos at the default.
GENERATED_THRESHOLDS = (DecisionThresholds(0.40, 0.90), DecisionThresholds(0.571, 0.577))
PHOTO_THRESHOLDS = DecisionThresholds(0.40, None)


class Results:
    """JSON lines to stdout and to a file named by card and date."""

    def __init__(self, path: Path, info: dict[str, str]) -> None:
        self.path = path
        self.info = info
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")

    def emit(self, payload: dict[str, Any]) -> None:
        line = json.dumps({**payload, **self.info})
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        self._file.write(line + "\n")
        self._file.flush()


def card_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200'; a CPU -> 'cpu'."""
    if not torch.cuda.is_available():
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "gpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Timed runs after a warm-up (best of); --smoke times one.
REPEATS = {"repeat": 3}


def _rate(fn: Callable[[], Any], items: int, repeat: int = 3) -> float:
    fn()
    _sync()
    best = float("inf")
    for _ in range(min(repeat, REPEATS["repeat"])):
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return items / best


def _synthetic_index(name: str, sha256: str, dim: int, vectors: int) -> FaissIdentityIndex:
    """A flat index of random unit vectors, five per identity (search cost only)."""
    gallery = np.random.default_rng(0).standard_normal((vectors, dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    return FaissIdentityIndex.build(
        gallery,
        [f"id{i // 5}" for i in range(vectors)],
        ["synthetic"] * vectors,
        embedder_name=name,
        model_sha256=sha256,
        detector={},
        index_type="flat",
    )


def _filters(
    cpu: FaceEmbeddingPipeline,
    gpu: FaceEmbeddingPipeline,
    index_path: Path,
    device: str,
    thresholds: DecisionThresholds,
    served: bool,
) -> tuple[IdentityFilter, IdentityFilter]:
    out = []
    for pipeline, where in ((cpu, "cpu"), (gpu, device)):
        index = load_index_for(pipeline, index_path)
        index.use_device(where)
        checker = IdentityFilter(pipeline, index, thresholds, NoFacePolicy.REJECT)
        if served:
            checker = filter_for_generator(checker, "dcgan-digiface", FastPathMode.AUTO)
        out.append(checker)
    return out[0], out[1]


def _agreement_line(
    results: Results,
    what: str,
    reference: FilterRun,
    other: FilterRun,
    thresholds: DecisionThresholds,
    **extra: Any,
) -> None:
    agreement = compare_runs(reference, other, thresholds, NEAR_THRESHOLD)
    results.emit(
        {
            "bench": "gpu_agreement",
            "what": what,
            "identity_threshold": thresholds.identity,
            "replica_threshold": thresholds.replica,
            **extra,
            **agreement.summary(),
        }
    )


def agreement_section(results: Results, args: argparse.Namespace, tmp: Path) -> None:
    device = args.device
    cpu = build_embedding_pipeline("sface", MODELS, "cpu")
    gpu = build_embedding_pipeline("sface", MODELS, device)
    index_path = tmp / "demo-index"
    build_demo_index(load_dcgan_digiface(MODELS), cpu, identities=200, seed=1).save(index_path)
    images = generated_faces(args.agreement_images, seed=300)
    cpu_filter, gpu_filter = _filters(
        cpu, gpu, index_path, device, GENERATED_THRESHOLDS[0], served=True
    )
    start = time.perf_counter()
    reference = run_filter(cpu_filter, images, 64)
    cpu_seconds = time.perf_counter() - start
    on_device = run_filter(gpu_filter, images, args.batch)
    for thresholds in GENERATED_THRESHOLDS:
        _agreement_line(
            results,
            "cpu_vs_device_generated",
            reference,
            on_device,
            thresholds,
            cpu_reference_seconds=round(cpu_seconds, 1),
        )
    count = min(len(images), args.invariance_images)
    alone = run_filter(gpu_filter, images[:count], 1)
    _agreement_line(
        results,
        "device_batch_invariance",
        on_device[:count],
        alone,
        GENERATED_THRESHOLDS[0],
        batch=args.batch,
    )
    if device.startswith("cuda"):
        # What the policy buys: the same run with TF32 allowed, then the policy again.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            with_tf32 = run_filter(gpu_filter, images, args.batch)
            alone_tf32 = run_filter(gpu_filter, images[:count], 1)
        finally:
            apply_device_numerics(torch.device(device))
        for thresholds in GENERATED_THRESHOLDS:
            _agreement_line(
                results, "cpu_vs_device_generated_tf32_allowed", reference, with_tf32, thresholds
            )
        _agreement_line(
            results,
            "device_batch_invariance_tf32_allowed",
            with_tf32[:count],
            alone_tf32,
            GENERATED_THRESHOLDS[0],
            batch=args.batch,
        )
    _photo_agreement(results, cpu, gpu, device, tmp, args.photos)


def _photo_agreement(
    results: Results,
    cpu: FaceEmbeddingPipeline,
    gpu: FaceEmbeddingPipeline,
    device: str,
    tmp: Path,
    limit: int,
) -> None:
    faces = REPO / "tests" / "data" / "faces"
    gallery = tmp / "gallery"
    for identity in ("id01", "id02", "id03"):
        (gallery / identity).mkdir(parents=True)
        for photo in sorted((faces / "identities" / identity).glob("*.jpg")):
            (gallery / identity / photo.name).symlink_to(photo)
    index, _ = build_gallery_index(gallery, cpu, detector_settings=detector_manifest(cpu))
    index.save(tmp / "photo-index")
    photos = [decode_image(p) for p in sorted(faces.rglob("*.jpg"))][:limit]
    cpu_filter, gpu_filter = _filters(
        cpu, gpu, tmp / "photo-index", device, PHOTO_THRESHOLDS, served=False
    )
    _agreement_line(
        results,
        "cpu_vs_device_photos",
        run_filter(cpu_filter, photos, 8),
        run_filter(gpu_filter, photos, 8),
        PHOTO_THRESHOLDS,
    )


def _device_images(count: int, device: str) -> list[np.ndarray]:
    """DCGAN 64x64 faces generated on the device (the workload; seeds irrelevant here)."""
    checkpoint = torch.load(
        MODELS / "dcgan_digiface_weights.tar", map_location="cpu", weights_only=True
    )
    generator = DcganGenerator()
    generator.load_state_dict(checkpoint["netG_state_dict"])
    generator = generator.to(device).eval()
    with torch.inference_mode():
        latents = torch.randn(count, 100, generator=torch.Generator().manual_seed(0))
        return list(to_uint8_images(generator(latents.to(device))))


def _filter_rates(
    results: Results,
    bench: str,
    checker: IdentityFilter,
    images: Sequence[np.ndarray],
    batch: int,
    embed_alone: float,
    **extra: Any,
) -> None:
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    faces = sum(v.faces for b in batches for v in checker.check(b))
    for depth in (1, 2):
        times = StageTimes()

        def check_all(times: StageTimes = times, depth: int = depth) -> None:
            list(overlapped(lambda b: checker.check(b, observer=times), batches, depth))

        rate = _rate(check_all, faces, 2)
        results.emit(
            {
                "bench": bench,
                **extra,
                "batch_images": batch,
                "batches_in_flight": depth,
                "faces": faces,
                "filter_faces_per_s": round(rate, 1),
                "embedder_alone_faces_per_s": round(embed_alone, 1),
                "embedder_fraction": round(rate / embed_alone, 3),
                "stage_seconds_all_runs": {k: round(v, 3) for k, v in times.seconds.items()},
            }
        )


def default_section(results: Results, args: argparse.Namespace) -> None:
    """The default configuration (SFace, batched MTCNN, the served detection scope)."""
    device = args.device
    pipeline = build_embedding_pipeline("sface", MODELS, device)
    images = _device_images(args.images, device)
    detector = pipeline.aligner.detector
    assert isinstance(detector, MtcnnDetector)
    # The served scope (the full pyramid) and, for reference, the operator's opt-in fast path.
    scopes = {
        "gpu_default_detect": detector,
        "gpu_default_detect_fast_path": detector.with_settings(GENERATED_FAST_PATH),
    }
    for name, scope in scopes.items():
        for batch in (args.batch, 2 * args.batch):
            rate = _rate(
                lambda batch=batch, scope=scope: [
                    scope.detect(images[i : i + batch]) for i in range(0, len(images), batch)
                ],
                len(images),
                2,
            )
            results.emit({"bench": name, "batch": batch, "images_per_s": round(rate, 1)})
    _, crop_lists = FaceAligner(detector, 112).faces(images)
    crops = np.concatenate(crop_lists)
    embedder = pipeline.embedder
    best = 0.0
    for batch in (256, 1024):
        parts = [crops[i : i + batch] for i in range(0, len(crops), batch)]
        rate = _rate(lambda parts=parts: [embedder.embed(p) for p in parts], len(crops))
        best = max(best, rate)
        results.emit(
            {
                "bench": "gpu_default_embedder_alone",
                "embedder": f"sface ({getattr(embedder, 'backend', '?')}, fp32)",
                "batch": batch,
                "faces_per_s": round(rate, 1),
            }
        )
    index = _synthetic_index("sface", embedder.model_sha256, embedder.dim, args.index_vectors)
    index.use_device(device)
    full = IdentityFilter(pipeline, index, DecisionThresholds(0.40, None))
    served = filter_for_generator(full, "dcgan-digiface", FastPathMode.AUTO)
    _filter_rates(
        results,
        "gpu_default_filter",
        served,
        images,
        args.batch,
        best,
        index_vectors=index.vector_count,
    )


def facenet_section(results: Results, args: argparse.Namespace, tmp: Path) -> None:
    from facenet_pytorch import InceptionResnetV1

    device = args.device
    torch.manual_seed(0)
    weights = tmp / "20180402-114759-vggface2.pt"
    torch.save(
        InceptionResnetV1(pretrained=None, classify=True, num_classes=8631).state_dict(), weights
    )
    fp32 = FacenetEmbedder(weights, device=device, bf16=False)
    bf16 = FacenetEmbedder(weights, device=device, bf16=True)
    images = _device_images(args.images, device)
    fast = MtcnnDetector(device=device).with_settings(GENERATED_FAST_PATH)
    aligner = FaceAligner(fast, 160)
    _, crop_lists = aligner.faces(images)
    crops = np.concatenate(crop_lists)
    chunks = [crops[i : i + 1024] for i in range(0, len(crops), 1024)]
    rates = {}
    for name, emb in (("fp32", fp32), ("bf16", bf16)):
        rates[name] = _rate(lambda emb=emb: [emb.embed(p) for p in chunks], len(crops))
        results.emit(
            {
                "bench": "gpu_facenet_embedder_alone",
                "precision": name,
                "batch": 1024,
                "faces_per_s": round(rates[name], 1),
            }
        )
    a = np.concatenate([fp32.embed(p) for p in chunks])
    c = np.concatenate([bf16.embed(p) for p in chunks])
    cosine = (a * c).sum(axis=1)
    results.emit(
        {
            "bench": "gpu_facenet_bf16_agreement",
            "faces": len(a),
            "cosine_bf16_vs_fp32_min": round(float(cosine.min()), 5),
        }
    )
    index = _synthetic_index("facenet", bf16.model_sha256, 512, args.index_vectors)
    index.use_device(device)
    pipeline = FaceEmbeddingPipeline(aligner, bf16, max_embed_batch=1024)
    checker = IdentityFilter(pipeline, index, DecisionThresholds(0.40, None))
    _filter_rates(
        results,
        "gpu_facenet_filter",
        checker,
        images,
        args.batch,
        rates["bf16"],
        index_vectors=index.vector_count,
    )


def batch_sweep(results: Results, args: argparse.Namespace) -> None:
    """The default filter's faces/s by images per batch (what cross-request batching buys)."""
    pipeline = build_embedding_pipeline("sface", MODELS, args.device)
    index = _synthetic_index("sface", pipeline.embedder.model_sha256, 128, args.index_vectors)
    index.use_device(args.device)
    checker = filter_for_generator(
        IdentityFilter(pipeline, index, DecisionThresholds(0.40, None)),
        "dcgan-digiface",
        FastPathMode.AUTO,
    )
    work = _device_images(min(args.images, 1024), args.device)
    faces = sum(v.faces for v in checker.check(work))
    base = 0.0
    for batch in (8, 32, 128, 512):
        rate = _rate(
            lambda batch=batch: [
                checker.check(work[i : i + batch]) for i in range(0, len(work), batch)
            ],
            faces,
            2,
        )
        base = base or rate
        results.emit(
            {
                "bench": "gpu_filter_batch_sweep",
                "images_per_batch": batch,
                "filter_faces_per_s": round(rate, 1),
                "vs_batch_8": round(rate / base, 2),
            }
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on the CPU")
    parser.add_argument("--sections", default="agreement,default,facenet")
    parser.add_argument("--batch-sweep", action="store_true", help="only the batch sweep")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--agreement-images", type=int, default=1000)
    parser.add_argument("--invariance-images", type=int, default=256)
    parser.add_argument("--photos", type=int, default=1000, help="at most this many photos")
    parser.add_argument("--index-vectors", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None, help="the results file")
    parser.add_argument(
        "--out-dir", type=Path, default=REPO / "bench" / "results", help="or its folder"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.batch, args.agreement_images = 16, 8, 16
        args.invariance_images, args.photos, args.index_vectors = 8, 4, 2000
        REPEATS["repeat"] = 1
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device (use --smoke on the CPU)")
    # cuDNN's autotuner stays off, as in the service: these are the served numbers.
    card = device_name()
    date = time.strftime("%Y-%m-%d")
    out = args.out or args.out_dir / f"gpu-{card_slug(card)}-{date}.jsonl"
    results = Results(out, {"device": card, "torch": torch.__version__})
    sections = ["sweep"] if args.batch_sweep else args.sections.split(",")
    with tempfile.TemporaryDirectory(prefix="facegate-gpu-bench-") as tmp:
        for section in sections:
            start = time.perf_counter()
            if section == "agreement":
                agreement_section(results, args, Path(tmp))
            elif section == "default":
                default_section(results, args)
            elif section == "facenet":
                facenet_section(results, args, Path(tmp))
            elif section == "sweep":
                batch_sweep(results, args)
            else:
                parser.error(f"unknown section {section!r}")
            results.emit(
                {
                    "bench": "gpu_section_done",
                    "section": section,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
