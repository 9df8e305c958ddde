"""`facegate serve` and `facegate generate`: the server and its command-line client."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from service.cli.common import CliError, emit
from service.config import Settings


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from service.server import main_serve

    return main_serve(settings)


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    from service.client import generate_to_folder

    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")
    # Defaults: FACEGATE_TLS_CLIENT_CERT / _KEY, the client certificate of this host.

    summary = generate_to_folder(
        target=args.target,
        count=args.count,
        seed=args.seed,
        out=Path(args.out),
        image_format=args.format,
        timeout=args.timeout,
        tls_ca=args.tls_ca or (str(settings.tls_ca) if settings.tls_ca else None),
        tls_cert=args.tls_cert
        or (str(settings.tls_client_cert) if settings.tls_client_cert else None),
        tls_key=args.tls_key or (str(settings.tls_client_key) if settings.tls_client_key else None),
        tls_server_name=args.tls_server_name,
    )
    emit(summary)
    return 0 if summary.get("status") == "OK" else 1


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the gRPC server (configured by FACEGATE_* env)")
    serve.set_defaults(handler=cmd_serve)

    gen = sub.add_parser("generate", help="call a server and write the images to a folder")
    gen.add_argument("--target", default="localhost:50051", metavar="HOST:PORT")
    gen.add_argument("--count", type=int, required=True)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--format", choices=["png", "jpeg"], default="png")
    gen.add_argument("--out", required=True, metavar="DIR")
    gen.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    gen.add_argument("--tls-ca", help="CA certificate to verify a TLS server (FACEGATE_TLS_CA)")
    gen.add_argument(
        "--tls-cert",
        help="client certificate, for a server with mutual TLS (FACEGATE_TLS_CLIENT_CERT)",
    )
    gen.add_argument(
        "--tls-key", help="the client certificate's private key (FACEGATE_TLS_CLIENT_KEY)"
    )
    gen.add_argument("--tls-server-name", help="name to expect in the server's certificate")
    gen.set_defaults(handler=cmd_generate)
