"""Finding the real peers (Debian packages) the interop tests drive.

A missing tool skips the test on a developer's machine, but fails it when
AIOISCSI_REQUIRE_TOOLS=1 (set by .ci/run), so CI can never go green by
silently skipping the interoperability proof.
"""

from __future__ import annotations

import os
import shutil

import pytest

_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def tools_required() -> bool:
    """True when a missing tool must fail the test instead of skipping it."""
    return os.environ.get("AIOISCSI_REQUIRE_TOOLS", "") not in ("", "0")


def find_tool(name: str) -> str | None:
    """Return the path of ``name`` on PATH or in the sbin directories."""
    path = shutil.which(name)
    if path is None:
        for d in _EXTRA_DIRS:
            candidate = os.path.join(d, name)
            if os.access(candidate, os.X_OK):
                return candidate
    return path


def require_tool(name: str) -> str:
    """Return the path of tool ``name``, or skip/fail the calling test."""
    path = find_tool(name)
    if path is None:
        msg = f"{name} is not installed (run the test command from README.md as root to install it)"
        if tools_required():
            pytest.fail(msg)
        pytest.skip(msg)
    return path
