"""The project's own pins install where the project runs: Python 3.10 (the NGC 24.10 image's) to 3.12.

A pin of a release that needs a newer Python fails the serving image's `pip install` (matplotlib
3.11.2 needs 3.11): each such pin must be limited by a python_version marker, with an older pin
beside it for 3.10. Read from the installed packages' metadata, so nothing is fetched."""

from __future__ import annotations

from importlib import metadata

import tomllib
from helpers import ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

OLDEST = "3.10.12"  # the NGC 24.10 image's Python


def test_every_pin_without_a_python_marker_installs_on_the_oldest_python():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert SpecifierSet(project["requires-python"]).contains(OLDEST)
    unmarked = [Requirement(text) for text in project["dependencies"] if ";" not in text]
    checked, refused = [], []
    for requirement in unmarked:
        requires_python = metadata.metadata(requirement.name).get("Requires-Python")
        checked.append(requirement.name)
        if requires_python and not SpecifierSet(requires_python).contains(OLDEST):
            refused.append(f"{requirement} needs Python {requires_python}")
    assert refused == []
    assert len(checked) >= 15  # every unmarked pin was looked at


def test_each_pin_limited_to_newer_pythons_has_one_for_the_oldest():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    marked = [Requirement(text) for text in project["dependencies"] if ";" in text]
    for name in {requirement.name for requirement in marked}:
        environments = [requirement.marker.evaluate({"python_version": "3.10"}) for requirement in marked if requirement.name == name]
        if name != "imagecodecs":  # no wheel for 3.10; preprocess decodes with pydicom there
            assert environments.count(True) == 1, name
