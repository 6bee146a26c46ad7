"""Reporting the outcomes: a console summary, JSON and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

from .model import Outcome, Verdict

_MARK = {Verdict.PASS: "PASS", Verdict.FAIL: "FAIL", Verdict.WARNING: "WARN",
         Verdict.NOT_SUPPORTED: "N/S ", Verdict.ERROR: "ERR "}


def summary(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Count per verdict (every verdict present, zero or not)."""
    c = Counter(o.verdict for o in outcomes)
    return {v.value: c.get(v, 0) for v in Verdict}


def print_outcome(o: Outcome, out: TextIO, verbose: bool) -> None:
    """One line per test; the rule, offending PDU and (verbose) the
    transcript under anything that is not a pass."""
    line = f"{_MARK[o.verdict]} {o.spec.id:<44} {o.duration:6.2f}s"
    if o.message:
        line += f"  {o.message}"
    print(line, file=out)
    if o.verdict in (Verdict.FAIL, Verdict.WARNING):
        print(f"     rule: {o.spec.rule}: {o.spec.description}", file=out)
        if o.pdu:
            print(f"     offending PDU: {o.pdu}", file=out)
    if verbose and o.verdict in (Verdict.FAIL, Verdict.WARNING, Verdict.ERROR):
        for t in o.transcript:
            print(f"       {t}", file=out)


def print_summary(outcomes: Sequence[Outcome], out: TextIO) -> None:
    """The closing count line."""
    s = summary(outcomes)
    print(f"\n{len(outcomes)} tests: " + ", ".join(f"{n} {k}" for k, n in s.items()), file=out)


def to_json(outcomes: Sequence[Outcome], target: str) -> dict[str, Any]:
    """The JSON report (``--json``)."""
    return {
        "target": target,
        "summary": summary(outcomes),
        "results": [
            {
                "id": o.spec.id, "section": o.spec.section, "level": o.spec.level.value,
                "description": o.spec.description, "verdict": o.verdict.value,
                "message": o.message, "pdu": o.pdu, "duration": round(o.duration, 3),
                "transcript": o.transcript if o.verdict is not Verdict.PASS else [],
            }
            for o in outcomes
        ],
    }


def write_json(path: str, outcomes: Sequence[Outcome], target: str) -> None:
    """Write the JSON report to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_json(outcomes, target), f, indent=2)
        f.write("\n")


def to_junit(outcomes: Sequence[Outcome], target: str) -> ET.ElementTree:
    """JUnit XML: one testsuite per family; fail -> <failure>, error ->
    <error>, not-supported -> <skipped>, warning -> a pass with its note in
    <system-out>."""
    root = ET.Element("testsuites", name="iscsi-conformance")
    families: dict[str, list[Outcome]] = {}
    for o in outcomes:
        families.setdefault(o.spec.family, []).append(o)
    for fam, outs in families.items():
        s = summary(outs)
        suite = ET.SubElement(root, "testsuite", name=fam, tests=str(len(outs)),
                              failures=str(s["fail"]), errors=str(s["error"]),
                              skipped=str(s["not-supported"]),
                              time=f"{sum(o.duration for o in outs):.3f}")
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="target",
                      value=target)
        for o in outs:
            case = ET.SubElement(suite, "testcase", classname=o.spec.suite, name=o.spec.id,
                                 time=f"{o.duration:.3f}")
            detail = "\n".join([f"rule: {o.spec.rule}", o.spec.description]
                               + ([f"offending PDU: {o.pdu}"] if o.pdu else [])
                               + o.transcript)
            if o.verdict is Verdict.FAIL:
                ET.SubElement(case, "failure", message=o.message, type=o.spec.level.value).text = detail
            elif o.verdict is Verdict.ERROR:
                ET.SubElement(case, "error", message=o.message).text = detail
            elif o.verdict is Verdict.NOT_SUPPORTED:
                ET.SubElement(case, "skipped", message=o.message)
            elif o.verdict is Verdict.WARNING:
                ET.SubElement(case, "system-out").text = f"WARNING: {o.message}\n{detail}"
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(path: str, outcomes: Sequence[Outcome], target: str) -> None:
    """Write the JUnit XML report to ``path``."""
    to_junit(outcomes, target).write(path, encoding="utf-8", xml_declaration=True)
