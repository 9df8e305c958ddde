"""The `facegate` command line: a thin layer over filter/ and service/, one module per
command group. Heavy imports (torch, FAISS, gRPC) happen inside each command, so
`--help` is fast."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from service.cli import (
    audit_cmd,
    batch_cmd,
    calibrate_cmd,
    check_cmd,
    evaluate_cmd,
    index_cmd,
    models_cmd,
    serve_cmd,
    verify_cmd,
)
from service.cli.common import EXIT_USAGE, CliError
from service.config import ConfigError, load_settings, unknown_env_warnings

COMMAND_MODULES = (
    models_cmd,
    index_cmd,
    check_cmd,
    batch_cmd,
    calibrate_cmd,
    evaluate_cmd,
    serve_cmd,
    verify_cmd,
    audit_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facegate",
        description="Face generation that never releases a face of a training identity.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `facegate` alone: list the commands
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "count", None) is not None and args.count < 1:
        parser.error("--count must be at least 1")
    # Before anything else can fail: a mistyped name often explains the failure.
    # (The server logs them itself, first thing, once logging is set up.)
    warnings = unknown_env_warnings()
    if args.command != "serve":
        for warning in warnings:
            print(f"facegate: warning: {warning}", file=sys.stderr)
    try:
        settings = load_settings()
    except ConfigError as exc:
        if args.command == "serve":
            for warning in warnings:
                print(f"facegate: warning: {warning}", file=sys.stderr)
        print(f"facegate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from batch.errors import BatchError
    from filter.errors import FilterError

    # Indexes, calibrations and audit files say who is in the training set: whatever a
    # command creates is owner-only.
    previous_umask = os.umask(0o077)
    try:
        return int(args.handler(settings, args))
    except (CliError, FilterError, BatchError) as exc:
        print(f"facegate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a path the command could not read or write: it names it
        print(f"facegate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        os.umask(previous_umask)


__all__ = ["EXIT_USAGE", "CliError", "build_parser", "main"]
