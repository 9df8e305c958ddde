"""The `facegate` command as the tests run it: `facegate` calls the CLI's `main()` in this
process with its own environment, working folder and streams (a fresh interpreter per call
would import torch two dozen times); `facegate_process` runs it as a user would, in a real
subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from service.cli import main as facegate_main
from tests.conftest import REPO


@contextlib.contextmanager
def _environment(overrides: dict[str, str], cwd: Path) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in overrides}
    previous_cwd = Path.cwd()
    os.environ.update(overrides)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(previous_cwd)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def facegate(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """`facegate ARGS` in this process; an uncaught exception is a traceback on stderr and
    exit 1, as the console script would give."""
    overrides = {"FACEGATE_MODELS_DIR": str(REPO / "models"), **(env or {})}
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        _environment(overrides, cwd),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            code = facegate_main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(
        ["facegate", *args], code, stdout.getvalue(), stderr.getvalue()
    )


def facegate_process(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: this checkout's code, whatever the working folder (an editable install
    # elsewhere would otherwise win outside the repository root).
    full_env = {
        **os.environ,
        "FACEGATE_MODELS_DIR": str(REPO / "models"),
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=600,
        check=False,
    )
