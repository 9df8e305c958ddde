"""A server does not start on a link flipped by hand to an older release that would undo
an identity edit facegate published there (the record beside the link; the rule itself:
tests/unit/test_startup_lineage.py). It exits 2 saying why, before it listens."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

from filter.index_release import flip_link
from service.server import main_serve
from tests.commands import facegate
from tests.servers import settings_for


def _serve(settings: object) -> int:
    # In process (a subprocess costs seconds of imports). `facegate serve` resets
    # SIGINT/SIGTERM: put them back.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main_serve(settings)  # type: ignore[arg-type]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_restart_on_a_hand_flipped_link_that_undoes_a_removal_exits_2(
    demo_index: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = tmp_path / "releases" / "demo"
    shutil.copytree(demo_index, first)
    link = tmp_path / "current"
    flip_link(link, first)
    identity = json.loads((first / "labels.json").read_text())[0]["identity"]
    removed = facegate("index", "remove", str(link), "--identity", identity)
    assert removed.returncode == 0, removed.stderr
    edited = Path(os.path.realpath(link))
    assert edited != first

    flip_link(link, first)  # by hand: the erased identity would be back in the index
    caplog.set_level(logging.ERROR)
    assert _serve(settings_for(link, tmp_path)) == 2
    assert "cannot start:" in caplog.text
    assert "1 removal(s), whose identities would be back" in caplog.text
    assert identity not in caplog.text  # the log names no one
