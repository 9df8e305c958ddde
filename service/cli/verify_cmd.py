"""`facegate verify`: what each image's content credentials (C2PA) say, one JSON line each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.cli.common import CliError, emit
from service.config import Settings

EXIT_UNREADABLE = 1


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    import c2pa

    from service.credentials import read_credentials, sniff_media_type

    anchors: bytes | None = None
    if args.trust_anchors is not None:
        try:
            anchors = Path(args.trust_anchors).read_bytes()
        except OSError as exc:
            raise CliError(f"--trust-anchors {args.trust_anchors}: {exc.strerror}") from None
    unreadable = 0
    for path in args.images:
        line: dict[str, Any] = {"path": path}
        try:
            data = Path(path).read_bytes()
            media_type = sniff_media_type(data)
            if media_type is None:
                raise ValueError("not a PNG or JPEG file")
            line |= read_credentials(data, media_type, anchors)
        except (OSError, ValueError, c2pa.C2paError) as exc:
            unreadable += 1
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            line |= {"manifest": None, "error": message}
            print(f"error: {path}: {message}", file=sys.stderr)
        emit(line)
    return EXIT_UNREADABLE if unreadable else 0


def register(sub: Any) -> None:
    verify = sub.add_parser(
        "verify",
        help="read each image's content credentials (C2PA); one JSON line each",
        description="One JSON line per image: manifest present, signature valid, trust "
        "(trusted, untrusted: a root on no trust list given, e.g. the demo test chain), the "
        "AI-generated action and the facegate assertion. Exit 1 if a file could not be read "
        "(the others are still reported).",
    )
    verify.add_argument(
        "--trust-anchors", metavar="PEM", help="root certificates to trust (PEM bundle)"
    )
    verify.add_argument("images", nargs="+", metavar="IMAGE")
    verify.set_defaults(handler=cmd_verify)
