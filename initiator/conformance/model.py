"""What a conformance test is: its declaration, its verdicts and the
registry the family modules fill.

A test is a function of a :class:`~initiator.conformance.context.Context`
declared with :func:`conformance_test`. It returns a short note on success
and raises :class:`Failed`, :class:`Warned`, :class:`NotSupported` or
:class:`TestError` otherwise; the runner turns those into an
:class:`Outcome`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .context import Context


class Verdict(Enum):
    """The five answers a test can give."""

    PASS = "pass"
    FAIL = "fail"
    WARNING = "warning"
    NOT_SUPPORTED = "not-supported"
    ERROR = "error"


class Level(Enum):
    """RFC 2119 strength of the rule a test checks."""

    MUST = "MUST"
    SHOULD = "SHOULD"


class Failed(Exception):
    """The target broke the rule; ``pdu`` is the offending PDU, decoded."""

    def __init__(self, message: str, pdu: str | None = None) -> None:
        super().__init__(message)
        self.pdu = pdu


class Warned(Exception):
    """The target broke a SHOULD (or answered in a tolerated but odd way)."""


class NotSupported(Exception):
    """The target declined a negotiable feature the test needs."""


class TestError(Exception):
    """The test could not run (connection refused, login impossible...)."""


TestFunc = Callable[["Context"], "str | None"]


@dataclass(frozen=True)
class TestSpec:
    """The declaration of one test.

    Attributes:
        id: ``family.suite.test``.
        section: where the rule is, e.g. ``"RFC 7143 §11.12.4"``.
        level: MUST or SHOULD.
        description: what it sends and which answers conform.
        func: the test body.
        dataloss: writes to the LUN or disturbs other initiators (resets):
            runs only with ``--allow-dataloss``.
        needs_chap: needs CHAP credentials in the URL.
    """

    id: str
    section: str
    level: Level
    description: str
    func: TestFunc = field(repr=False, compare=False)
    dataloss: bool = False
    needs_chap: bool = False

    @property
    def family(self) -> str:
        """The first component of the id."""
        return self.id.split(".", 1)[0]

    @property
    def suite(self) -> str:
        """``family.suite``."""
        return self.id.rsplit(".", 1)[0]

    @property
    def rule(self) -> str:
        """The rule cited in a failure: section and level."""
        return f"{self.section} ({self.level.value})"


@dataclass
class Outcome:
    """The result of running one test."""

    spec: TestSpec
    verdict: Verdict
    message: str = ""
    pdu: str | None = None
    duration: float = 0.0
    transcript: list[str] = field(default_factory=list)


#: Every declared test, in declaration order (family modules append).
REGISTRY: list[TestSpec] = []


def conformance_test(test_id: str, section: str, level: Level, description: str, *,
                     dataloss: bool = False,
                     needs_chap: bool = False) -> Callable[[TestFunc], TestFunc]:
    """Declare a test (decorator). ``section`` without an RFC prefix means
    RFC 7143."""
    if test_id.count(".") != 2:
        raise ValueError(f"test id {test_id!r} is not family.suite.test")
    if any(s.id == test_id for s in REGISTRY):
        raise ValueError(f"test {test_id} declared twice")
    where = section if section.startswith(("RFC", "SAM", "SPC", "SBC")) else f"RFC 7143 §{section}"

    def register(func: TestFunc) -> TestFunc:
        REGISTRY.append(TestSpec(test_id, where, level, description, func, dataloss, needs_chap))
        return func
    return register
