"""libiscsi's conformance suite against our target (issue #3's proof).

``iscsi-test-cu`` family ALL runs against a thin-provisioned raw LUN with
``-d`` (destructive tests allowed) and a second URL for the multipath tests.
Every test must pass or skip; the skips and their reasons are listed in
README.md ("Conformance").
"""

from __future__ import annotations

import re
import subprocess

import pytest

from target.config import LunSpec
from tests.target_fixture import make_config, running_target
from tests.tools import require_tool

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def _counts(output: str) -> tuple[int, int, int]:
    m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", output)
    assert m, f"no CUnit summary in output:\n{output[-3000:]}"
    return int(m.group(2)), int(m.group(3)), int(m.group(4))


def test_iscsi_test_cu_all(tmp_path: pytest.TempPathFactory) -> None:
    tool = require_tool("iscsi-test-cu")
    img = tmp_path / "thin.img"  # type: ignore[operator]
    with open(img, "wb") as f:
        f.truncate(128 << 20)  # sparse: UNMAP punches holes in it
    config = make_config([LunSpec(lun=0, path=str(img), backend="raw")])
    with running_target(config) as target:
        url = target.url()
        proc = subprocess.run([tool, "-d", "-n", "--test=ALL", url, url], capture_output=True, text=True,
                              timeout=900)
    out = proc.stdout + proc.stderr
    ran, passed, failed = _counts(out)
    skipped = len(set(re.findall(r"\[SKIPPED\] (.*)", out)))
    print(f"\niscsi-test-cu ALL: {ran} run, {passed} passed, {failed} failed, "
          f"{skipped} distinct skip reasons")
    failures = re.findall(r"Suite (.*), Test (.*) had failures", out)
    assert failed == 0, f"failing tests: {failures}\n" + out[-4000:]
    assert ran >= 200
