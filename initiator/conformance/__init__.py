"""``iscsi-conformance``: a PDU-level conformance kit for iSCSI targets.

Each test is declared with its RFC section, its MUST/SHOULD level and what
answers conform (:mod:`.model`); the families live in their own modules
(login, login_keys, chap, ffp, ffp_data, tmf, digests, erl, mcs) and drive
the target over a raw connection of the kit's own (:mod:`.wire`) with the
project's sans-I/O codec. :mod:`.runner` selects and runs them and
:mod:`.report` writes the console, JSON and JUnit reports.
"""

from __future__ import annotations

from .context import KitConfig
from .model import REGISTRY, Level, Outcome, TestSpec, Verdict
from .runner import main, run, run_one, select

__all__ = ["REGISTRY", "KitConfig", "Level", "Outcome", "TestSpec", "Verdict", "main", "run",
           "run_one", "select"]
