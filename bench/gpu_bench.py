"""GPU filter throughput: run on a CUDA machine with FACEGATE_DEVICE=cuda semantics.

    python -m bench.gpu_bench [--images N]

Reports, for the card it runs on: MTCNN detection images/s (full and generated fast
path), embedder-alone faces/s (InceptionResnetV1 at fp32 and bf16, with the bf16/fp32
cosine agreement), and the whole filter's faces/s (detect, align, embed, search) with
its fraction of the embedder-alone throughput. The facenet weights are a state dict the
script writes itself in the published format (random values: the same compute as the
VGGFace2 weights; agreement figures compare bf16 with fp32 on the same weights).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import MODELS, device_name, emit
from filter.embedders import FacenetEmbedder
from filter.faces import GENERATED_FAST_PATH, FaceAligner, MtcnnDetector
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter, StageTimes
from filter.index import FaissIdentityIndex
from service.generators import DcganGenerator, to_uint8_images


def _synthetic_index(model_sha256: str, vectors: int = 100_000) -> FaissIdentityIndex:
    """A flat index of random unit vectors, five per identity (search cost only)."""
    gallery = np.random.default_rng(0).standard_normal((vectors, 512)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    return FaissIdentityIndex.build(
        gallery,
        [f"id{i // 5}" for i in range(vectors)],
        ["synthetic"] * vectors,
        embedder_name="facenet",
        model_sha256=model_sha256,
        detector={},
        index_type="flat",
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rate(fn: Any, items: int, repeat: int = 3) -> float:
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return items / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test")
    parser.add_argument(
        "--batch-sweep",
        action="store_true",
        help="only the filter's faces/s by images per batch (what cross-request batching buys)",
    )
    args = parser.parse_args()
    device = args.device
    if device == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA device"
    torch.backends.cudnn.benchmark = True
    info = {"device": device_name(), "torch": torch.__version__}

    # Workload: DCGAN 64x64 faces generated on the GPU.
    checkpoint = torch.load(
        MODELS / "dcgan_digiface_weights.tar", map_location="cpu", weights_only=True
    )
    generator = DcganGenerator()
    generator.load_state_dict(checkpoint["netG_state_dict"])
    generator = generator.to(device).eval()
    with torch.inference_mode():
        latents = torch.randn(args.images, 100, generator=torch.Generator().manual_seed(0))
        gen_rate = _rate(lambda: generator(latents.to(device)), args.images)
        images = list(to_uint8_images(generator(latents.to(device))))
    emit({"bench": "gpu_generate", **info, "images_per_s": round(gen_rate, 1)})

    detector = MtcnnDetector(device=device)
    fast = detector.with_settings(GENERATED_FAST_PATH)
    b = args.batch

    def detect_all(det: MtcnnDetector, batch: int) -> None:
        for i in range(0, len(images), batch):
            det.detect(images[i : i + batch])

    for batch in (b, 2 * b):
        full_rate = _rate(lambda batch=batch: detect_all(detector, batch), len(images), 2)
        fast_rate = _rate(lambda batch=batch: detect_all(fast, batch), len(images), 2)
        emit(
            {
                "bench": "gpu_detect",
                **info,
                "batch": batch,
                "full_images_per_s": round(full_rate, 1),
                "fast_path_images_per_s": round(fast_rate, 1),
            }
        )

    with tempfile.TemporaryDirectory() as tmp:
        from facenet_pytorch import InceptionResnetV1

        torch.manual_seed(0)
        weights = Path(tmp) / "20180402-114759-vggface2.pt"
        torch.save(
            InceptionResnetV1(pretrained=None, classify=True, num_classes=8631).state_dict(),
            weights,
        )
        fp32 = FacenetEmbedder(weights, device=device, bf16=False)
        bf16 = FacenetEmbedder(weights, device=device, bf16=True)

    aligner = FaceAligner(fast, 160)
    if args.batch_sweep:
        _batch_sweep(images, aligner, bf16, device, info)
        return
    _, crop_lists = aligner.faces(images)
    crops = np.concatenate(crop_lists)
    crops_gpu_batches = [crops[i : i + 1024] for i in range(0, len(crops), 1024)]
    for name, emb in (("fp32", fp32), ("bf16", bf16)):
        for batch in (256, 1024):
            parts = [crops[i : i + batch] for i in range(0, len(crops), batch)]
            rate = _rate(lambda parts=parts, emb=emb: [emb.embed(p) for p in parts], len(crops))
            emit(
                {
                    "bench": "gpu_embedder_alone",
                    **info,
                    "precision": name,
                    "batch": batch,
                    "faces_per_s": round(rate, 1),
                }
            )
    a = np.concatenate([fp32.embed(p) for p in crops_gpu_batches])
    c = np.concatenate([bf16.embed(p) for p in crops_gpu_batches])
    agreement = (a * c).sum(axis=1)
    emit(
        {
            "bench": "gpu_bf16_agreement",
            **info,
            "faces": len(a),
            "cosine_bf16_vs_fp32_min": round(float(agreement.min()), 5),
            "cosine_bf16_vs_fp32_mean": round(float(agreement.mean()), 5),
        }
    )

    # The whole filter on the GPU: fast-path detection, alignment, bf16 embedding, search.
    index = _synthetic_index(bf16.model_sha256)
    filt = IdentityFilter(FaceEmbeddingPipeline(aligner, bf16, max_embed_batch=1024), index, 0.4)
    faces = len(crops)
    embed_alone = _rate(lambda: [bf16.embed(p) for p in crops_gpu_batches], faces)
    for search in ("faiss_cpu", "torch_gpu_fp16"):
        if search == "torch_gpu_fp16":
            index.use_device(device)
        times = StageTimes()

        def check_all(times: StageTimes = times) -> None:
            for i in range(0, len(images), b):
                filt.check(images[i : i + b], observer=times)

        rate = _rate(check_all, faces, 2)
        stage_seconds = {k: round(v, 3) for k, v in times.seconds.items()}
        emit(
            {
                "bench": "gpu_filter",
                **info,
                "search": search,
                "batch_images": b,
                "faces": faces,
                "filter_faces_per_s": round(rate, 1),
                "embedder_alone_faces_per_s": round(embed_alone, 1),
                "embedder_fraction": round(rate / embed_alone, 3),
                "index_vectors": index.vector_count,
                "stage_seconds_all_runs": stage_seconds,
            }
        )


def _batch_sweep(
    images: list[np.ndarray],
    aligner: FaceAligner,
    embedder: FacenetEmbedder,
    device: str,
    info: dict[str, str],
) -> None:
    """Per-request batches (8 images, one request at count=8) against batches gathered
    across requests, on the same filter: what the dynamic batcher buys on this card."""
    index = _synthetic_index(embedder.model_sha256)
    index.use_device(device)
    filt = IdentityFilter(
        FaceEmbeddingPipeline(aligner, embedder, max_embed_batch=1024), index, 0.4
    )
    work = images[:1024]
    faces = sum(v.faces for v in filt.check(work))
    base = 0.0
    for batch in (8, 32, 128, 512):

        def check_all(batch: int = batch) -> None:
            for i in range(0, len(work), batch):
                filt.check(work[i : i + batch])

        rate = _rate(check_all, faces, 2)
        base = base or rate
        emit(
            {
                "bench": "gpu_filter_batch_sweep",
                **info,
                "images_per_batch": batch,
                "filter_faces_per_s": round(rate, 1),
                "vs_batch_8": round(rate / base, 2),
            }
        )


if __name__ == "__main__":
    main()
