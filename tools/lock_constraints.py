"""Write constraints.txt from a pip resolution report: `make lock`.

pip resolves pyproject.toml's requirements afresh (`pip install --dry-run --report`,
without the old constraints, which a changed requirement may exclude), and every package
it would install is locked at that version. The file's leading comment is kept.

    python tools/lock_constraints.py REPORT.json constraints.txt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def locked_lines(report: dict[str, object]) -> list[str]:
    lines = []
    for item in report.get("install", []):  # type: ignore[union-attr]
        metadata = item["metadata"]  # type: ignore[index]
        download = item.get("download_info", {})  # type: ignore[union-attr]
        if download.get("dir_info", {}).get("editable"):
            continue  # facegate itself, from this checkout
        lines.append(f"{metadata['name']}=={metadata['version']}")
    return sorted(lines, key=str.lower)


def main(argv: list[str]) -> int:
    report_path, constraints_path = Path(argv[0]), Path(argv[1])
    report = json.loads(report_path.read_text())
    header = []
    if constraints_path.exists():
        for line in constraints_path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
    lines = locked_lines(report)
    if not lines:
        print(f"{report_path}: pip would install nothing; constraints.txt left alone")
        return 1
    constraints_path.write_text("\n".join([*header, *lines]) + "\n")
    print(f"locked {len(lines)} packages in {constraints_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
