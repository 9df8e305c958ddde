"""constraints.txt holds every dependency at one version that pyproject.toml admits.

A fresh clone installs with it (make setup, the Dockerfile), so a release made after the
lock cannot change lint, types or verdicts; these tests keep the two files from drifting.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def _locked_versions() -> dict[str, str]:
    locked: dict[str, str] = {}
    for number, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt line {number} is not name==version: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in locked, f"constraints.txt names {name} twice"
        locked[name] = match[2]
    return locked


def _declared_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared.extend(extra)
    return [Requirement(text) for text in declared]


def test_every_declared_dependency_is_locked_at_a_version_it_admits() -> None:
    locked = _locked_versions()
    for requirement in _declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is in pyproject.toml but not constraints.txt"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt locks {name}=={locked[name]}, which pyproject.toml's "
            f"{requirement} does not admit"
        )


def test_the_lock_is_used_by_setup_and_the_image() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install [^\n]*-c constraints\.txt -e '\.\[dev\]'", makefile)
    assert re.search(r"^\$\(STAMP\): [^\n]*constraints\.txt", makefile, re.M)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install -c constraints.txt ." in dockerfile
    assert re.search(r"^COPY [^\n]*constraints\.txt", dockerfile, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "constraints.txt" not in ignored


def test_the_image_installs_with_the_pip_setup_uses() -> None:
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"^PIP_VERSION := (\S+)$", makefile, re.M)
    assert pinned, "the Makefile pins no pip"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG PIP_VERSION={pinned.group(1)}" in dockerfile
    assert 'RUN pip install "pip==${PIP_VERSION}"' in dockerfile
    # Before anything else is installed with it.
    assert dockerfile.index("pip==${PIP_VERSION}") < dockerfile.index("-c constraints.txt")


def test_the_facegate_package_itself_is_not_locked() -> None:
    # An editable line (-e / file path) would tie a clone to the machine the lock was made on.
    assert "facegate" not in _locked_versions()
    assert not re.search(r"^(-e|.* @ )", (REPO / "constraints.txt").read_text(), re.M)


def test_make_lock_locks_what_pip_would_install_without_facegate_itself(tmp_path: Path) -> None:
    """`make lock` resolves afresh (`pip install --dry-run --report`): after a requirement
    changes, the old lock may exclude what pyproject now asks for."""
    from tools.lock_constraints import main

    report = {
        "install": [
            {"metadata": {"name": "numpy", "version": "2.5.0"}, "download_info": {}},
            {
                "metadata": {"name": "facegate", "version": "0.1.0"},
                "download_info": {"dir_info": {"editable": True}},
            },
            {"metadata": {"name": "Attrs", "version": "26.1.0"}, "download_info": {}},
        ]
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# kept\n# header\nnumpy==2.4.6\nold==1.0\n")
    assert main([str(tmp_path / "report.json"), str(constraints)]) == 0
    assert constraints.read_text() == "# kept\n# header\nAttrs==26.1.0\nnumpy==2.5.0\n"
    makefile = (REPO / "Makefile").read_text()
    lock = makefile.split("\nlock:")[1].split("\n\n")[0]
    assert "--dry-run" in lock and "--report" in lock and "-c constraints.txt" not in lock
