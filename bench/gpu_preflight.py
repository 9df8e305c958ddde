"""Before a GPU run: install the carried wheels the machine's python lacks, then check that
everything the GPU suite imports is there and that the GPU works with it.

    python -m bench.gpu_preflight [--wheels .whl] [--target .gpu/site] [--cpu]

A wheel in WHEELS is installed (pip --no-deps --no-index, into TARGET) only when its module
does not import already, so nothing the machine brings is replaced. Prints one JSON line;
exit status 2 names what is missing and the `pip download` command that fetches it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

# module -> the requirement that provides it (what the lead downloads for the device).
REQUIRED = {
    "torch": None,  # the machine's own
    "numpy": None,
    "cv2": None,
    "onnx": None,
    "PIL": None,
    "torchvision": "torchvision==0.26.0",  # the match of torch 2.11
    "facenet_pytorch": "facenet-pytorch==2.5.3",
    "requests": "requests",  # facenet_pytorch imports it at import time
    "urllib3": "urllib3",
    "idna": "idna",
    "certifi": "certifi",
    "charset_normalizer": "charset-normalizer",
    "faiss": "faiss-cpu==1.15.1",
    "packaging": "packaging",  # faiss-cpu, pytest
    "pytest": "pytest==9.2.0",
    "pluggy": "pluggy",
    "iniconfig": "iniconfig",
    "pygments": "pygments",
}
# Only the service benchmark needs these (a real server on loopback).
SERVICE = {
    "grpc": None,
    "google.protobuf": None,
    "pydantic": None,
    "prometheus_client": None,
    "pydantic_settings": "pydantic-settings",
    "dotenv": "python-dotenv",
    "typing_inspection": "typing-inspection",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
}
WHEEL_NAMES = {
    "torchvision": "torchvision",
    "facenet_pytorch": "facenet_pytorch",
    "requests": "requests",
    "urllib3": "urllib3",
    "idna": "idna",
    "certifi": "certifi",
    "charset_normalizer": "charset_normalizer",
    "faiss": "faiss_cpu",
    "packaging": "packaging",
    "pytest": "pytest",
    "pluggy": "pluggy",
    "iniconfig": "iniconfig",
    "pygments": "pygments",
    "pydantic_settings": "pydantic_settings",
    "dotenv": "python_dotenv",
    "typing_inspection": "typing_inspection",
    "grpc_health": "grpcio_health_checking",
    "grpc_reflection": "grpcio_reflection",
}
DOWNLOAD = (
    "pip download --no-deps --only-binary=:all: --python-version 3.12 "
    "--platform manylinux_2_28_x86_64 -d .whl "
)


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # an ImportError, or a broken build failing on import
        return False
    return True


def _install(wheels: Path, target: Path, modules: list[str]) -> list[str]:
    files = []
    for module in modules:
        prefix = WHEEL_NAMES.get(module)
        found = sorted(wheels.glob(f"{prefix}-*.whl")) if prefix else []
        if found:
            files.append(str(found[-1]))
    if files:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-index",
                "--target",
                str(target),
                *files,
            ],
            check=True,
        )
        importlib.invalidate_caches()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wheels", type=Path, default=Path(".whl"))
    parser.add_argument("--target", type=Path, default=Path(".gpu/site"))
    parser.add_argument("--cpu", action="store_true", help="no GPU expected (the smoke run)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.target.resolve()))
    wanted = {**REQUIRED, **SERVICE}
    missing = [m for m in wanted if not _imports(m)]
    installed = _install(args.wheels, args.target, missing) if missing else []
    still = [m for m in wanted if not _imports(m)]
    report: dict[str, object] = {
        "bench": "gpu_preflight",
        "python": sys.version.split()[0],
        "installed_from_wheels": [Path(f).name for f in installed],
        "missing_for_tests": [m for m in still if m in REQUIRED],
        "missing_for_service_bench": [m for m in still if m in SERVICE],
    }
    if "torch" not in still:
        import torch

        report["torch"] = torch.__version__
        report["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            report["card"] = torch.cuda.get_device_name(0)
            if "torchvision" not in still:
                import torchvision

                boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10]], device="cuda")
                keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8], device="cuda"), 0.5)
                report["torchvision"] = torchvision.__version__
                report["torchvision_nms_on_cuda"] = keep.tolist() == [0]
    print(json.dumps(report), flush=True)
    blocking = [m for m in still if m in REQUIRED]
    if blocking or (not args.cpu and not report.get("cuda")):
        needs = sorted({r for m, r in wanted.items() if m in still and r})
        if needs:
            print(
                f"missing: {', '.join(still)}; fetch with:\n  {DOWNLOAD}{' '.join(needs)}",
                file=sys.stderr,
            )
        if not args.cpu and not report.get("cuda"):
            print("no CUDA device: run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
