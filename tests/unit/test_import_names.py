"""facegate installs its packages under the top-level names `filter`, `service` and `batch`
(README "Architecture": why they stay). A generic top-level name is safe only while no
other installed distribution claims it: the one that Python finds first would silently
win. This guards that in every environment the tests run in (the venv, the image)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

OUR_PACKAGES = ("filter", "service", "batch")
REPO = Path(__file__).resolve().parents[2]


def _top_level_names(dist: importlib.metadata.Distribution) -> set[str]:
    listed = dist.read_text("top_level.txt")
    if listed:
        return set(listed.split())
    # Wheels built without top_level.txt: the first part of each installed file's path.
    return {
        str(path).split("/")[0].removesuffix(".py")
        for path in dist.files or []
        if not str(path).startswith(("..", "/")) and ".dist-info" not in str(path)
    }


def test_no_other_distribution_installs_our_top_level_names() -> None:
    claimed = {
        name: sorted(
            {
                str(dist.metadata["Name"])
                for dist in importlib.metadata.distributions()
                if name in _top_level_names(dist)
            }
        )
        for name in OUR_PACKAGES
    }
    assert claimed == {name: ["facegate"] for name in OUR_PACKAGES}


def test_our_names_import_from_this_checkout() -> None:
    import batch
    import filter as filter_package
    import service

    for module in (filter_package, service, batch):
        assert module.__file__ is not None
        assert Path(module.__file__).resolve().parent.parent == REPO


def test_mutation_copy_holds_every_package_of_ours() -> None:
    # `make mutation` runs this tier inside mutmut's copy of the tree (mutants/); a package of
    # ours missing from that copy is imported from the checkout instead, and the test above
    # then fails there, so mutmut collects no stats and checks no mutant.
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    copied = {Path(path).parts[0] for path in [*config["source_paths"], *config["also_copy"]]}
    assert set(OUR_PACKAGES) <= copied
