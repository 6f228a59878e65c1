"""Proof that the conformance tests test something: every one of them fails on stock bqemulator 1.4.0."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

CONFORMANCE = [
    Path(__file__).with_name("test_bigquery_conformance.py"),
    Path(__file__).with_name("test_bigquery_cdc_conformance.py"),
]


def test_every_conformance_test_fails_on_the_unpatched_emulator(tmp_path: Path) -> None:
    report = tmp_path / "stock.xml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *map(str, CONFORMANCE),
            "-q",
            "-p",
            "no:cacheprovider",
            "--timeout=30",  # the stock server deadlocks on some of them: a hang is a failure, not a stall
            f"--junitxml={report}",
        ],
        env={**os.environ, "CDC_TEST_BIGQUERY_STOCK": "1"},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {case.get("name"): [child.tag for child in case] for case in cases}
    assert len(outcomes) >= 21, result.stdout[-3000:]
    passed_on_stock = [name for name, tags in outcomes.items() if not {"failure", "error"} & set(tags)]
    assert passed_on_stock == [], (
        f"these conformance tests do not detect the stock deviation: {passed_on_stock}"
    )
