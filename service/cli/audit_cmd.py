"""`facegate audit hash LABEL...`: the pseudonym the audit log writes for an identity label.

The audit log (and index-edit records) write each identity as a keyed hash, so that nobody
without the key can test a guessed name against it. An operator who knows a label (an
opt-out request, a suspected memorisation) maps it to its hash here and searches the log:
`grep "$(facegate audit hash person-0042)" audit.jsonl`.
"""

from __future__ import annotations

import argparse
from typing import Any

from service.cli.common import CliError, audit_key
from service.config import Settings


def cmd_audit_hash(settings: Settings, args: argparse.Namespace) -> int:
    from service.audit import identity_hasher

    master = audit_key(settings)
    if master is None:
        raise CliError(
            "no key to hash with: set FACEGATE_SEED_KEY_FILE (or FACEGATE_AUDIT_KEY_FILE, when "
            "the server has an audit key of its own) to the key the server uses"
        )
    digest = identity_hasher(master)
    for label in args.label:
        print(digest(label))
    return 0


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the operator audit log").add_subparsers(
        dest="audit_cmd", required=True
    )
    hashed = audit.add_parser(
        "hash",
        help="print the audit log's pseudonym of each identity label, one per line "
        "(key: FACEGATE_AUDIT_KEY_FILE, else FACEGATE_SEED_KEY_FILE)",
    )
    hashed.add_argument("label", nargs="+", help="identity label (the gallery folder name)")
    hashed.set_defaults(handler=cmd_audit_hash)
