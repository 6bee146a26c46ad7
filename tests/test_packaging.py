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


def test_man_pages_and_completions_generated(tmp_path: Path) -> None:
    """scripts/gen-docs builds them from the argparse definitions, so they
    never drift from the commands."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-docs"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("iscsi-target", "iscsi-initiator", "iscsi-conformance"):
        man = (tmp_path / "man" / f"{name}.1").read_text()
        assert man.startswith(".TH") and "SYNOPSIS" in man
        bash = (tmp_path / "completion" / "bash" / name).read_text()
        assert "complete" in bash
        assert (tmp_path / "completion" / "zsh" / f"_{name}").exists()
    target_man = (tmp_path / "man" / "iscsi-target.1").read_text()
    assert "serve" in target_man and "image" in target_man


@pytest.mark.parametrize("prog", ["iscsi-target", "iscsi-initiator"])
def test_version(prog: str) -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).with_name(prog)
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(f"{prog} ")
