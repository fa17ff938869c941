"""The test environment is the pinned one: what CI and a fresh machine install is what ran here."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = (line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    return {canonicalize_name(name): pinned.strip() for name, pinned in pairs}


def test_installed_packages_match_constraints() -> None:
    """Fails when the suite runs against drifted versions (pytest 9 once broke schemathesis)."""
    drifted = {}
    for name, pinned in pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            drifted[name] = (pinned, installed)
    assert not drifted, f"installed versions differ from constraints.txt (pinned, installed): {drifted}"


def test_every_declared_dependency_is_pinned() -> None:
    """A dependency added to pyproject.toml without `bash scripts/lock.sh` would float."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    declared = [*project["dependencies"], *(r for requirements in extras for r in requirements)]
    names = {canonicalize_name(Requirement(r).name) for r in declared} - {"r3-reward", "torch"}
    assert names - set(pins()) == set()


def test_torch_is_pinned_where_it_is_installed() -> None:
    assert "torch" not in pins()  # pinned by the install line itself, before anything else
    for script in ("scripts/test.sh", "scripts/lock.sh"):
        assert re.search(r"pip install -q (-c constraints.txt )?torch==2\.13\.0", (ROOT / script).read_text())
