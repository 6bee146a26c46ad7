"""Fixtures shared by test modules.

``ceph_cluster``: one throwaway Ceph cluster (tests/ceph_cluster.py) for the
whole session, started on first use. A missing Ceph package or binding
skips its tests, or fails them under AIOISCSI_REQUIRE_TOOLS=1.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.ceph_cluster import CephCluster, missing_tools, start_cluster
from tests.tools import tools_required


def _unavailable(msg: str) -> None:
    if tools_required():
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """A running one-node cluster with an ``rbd`` pool (about 6 s to start)."""
    missing = missing_tools()
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (Debian ceph-mon ceph-osd "
                     "ceph-common; run the test command from README.md as root)")
    try:
        importlib.import_module("rados")
        importlib.import_module("rbd")
    except ImportError as exc:
        _unavailable(f"Ceph Python bindings not importable ({exc}): install python3-rados "
                     "python3-rbd and run scripts/ceph-bindings with the venv's Python")
    base = tempfile.mkdtemp(prefix="aioiscsi-ceph-")
    try:
        cluster = start_cluster(base)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
