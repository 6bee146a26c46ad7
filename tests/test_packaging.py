"""What a packager or a type checker sees: license, classifiers, PEP 561
markers and the declared extras."""

from __future__ import annotations

import importlib.resources
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _project() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    project = data["project"]
    assert isinstance(project, dict)
    return project


def test_license_file_matches_metadata() -> None:
    project = _project()
    assert project["license"] == {"file": "LICENSE"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    classifiers = project["classifiers"]
    assert isinstance(classifiers, list)
    assert "License :: OSI Approved :: MIT License" in classifiers
    assert "Typing :: Typed" in classifiers


@pytest.mark.parametrize("package", ["iscsi", "target", "initiator"])
def test_py_typed_shipped(package: str) -> None:
    """PEP 561: the marker exists and is declared as package data, so
    ``mypy`` checks users' code against our annotations."""
    assert importlib.resources.files(package).joinpath("py.typed").is_file()
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert package_data[package] == ["py.typed"]


def test_optional_extras_declared() -> None:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    assert {"test", "fast", "fuse", "docs"} <= set(extras)
