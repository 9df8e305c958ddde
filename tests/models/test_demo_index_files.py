"""`facegate index demo` enrols keyed latents and writes owner-only files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_cli_demo_index_is_keyed_and_owner_only(tmp_path: Path) -> None:
    key = tmp_path / "seed.key"
    key.write_bytes(os.urandom(32))
    env = {
        **os.environ,
        "FACEGATE_MODELS_DIR": str(REPO / "models"),
        "FACEGATE_SEED_KEY_FILE": str(key),
    }
    out = tmp_path / "index"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "index",
            "demo",
            "--out",
            str(out),
            "--identities",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "not set" not in result.stderr  # keyed: no unkeyed warning
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert any(":keyed" in p.read_text() for p in files if p.suffix == ".json")
