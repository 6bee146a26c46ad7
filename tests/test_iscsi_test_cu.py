"""libiscsi's conformance suite against our target (issue #3's proof).

``iscsi-test-cu`` family ALL runs against a thin-provisioned raw LUN with
``-d`` (destructive tests allowed) and a second URL for the multipath tests.
Every test must pass or skip; the skips and their reasons are listed in
README.md ("Conformance").
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from target.backends.registry import create_image
from target.config import LunSpec
from tests.target_fixture import make_config, running_target
from tests.tools import require_tool

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def _counts(output: str) -> tuple[int, int, int]:
    m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", output)
    assert m, f"no CUnit summary in output:\n{output[-3000:]}"
    return int(m.group(2)), int(m.group(3)), int(m.group(4))


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vdi", "vhd", "vhdx", "vmdk"])
def test_iscsi_test_cu_all(tmp_path: Path, fmt: str) -> None:
    """Family ALL against a thin raw LUN (sparse: UNMAP punches holes) and
    against dynamic images of each format (issue #5)."""
    tool = require_tool("iscsi-test-cu")
    img = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        with open(img, "wb") as f:
            f.truncate(128 << 20)
    else:
        create_image(str(img), fmt, 128 << 20)
    config = make_config([LunSpec(lun=0, path=str(img), backend="auto")])
    with running_target(config) as target:
        url = target.url()
        proc = subprocess.run([tool, "-d", "-n", "--test=ALL", url, url], capture_output=True, text=True,
                              timeout=900)
    out = proc.stdout + proc.stderr
    ran, passed, failed = _counts(out)
    skipped = len(set(re.findall(r"\[SKIPPED\] (.*)", out)))
    print(f"\niscsi-test-cu ALL on {fmt}: {ran} run, {passed} passed, {failed} failed, "
          f"{skipped} distinct skip reasons")
    failures = re.findall(r"Suite (.*), Test (.*) had failures", out)
    assert failed == 0, f"failing tests: {failures}\n" + out[-4000:]
    assert ran >= 200
