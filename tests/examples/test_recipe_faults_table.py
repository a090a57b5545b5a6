"""``docs/faults.md`` names tests that exist: every ``file::test`` (and ``::test`` after it in a row)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"`(?:([\w/]+\.py))?::(\w+)(?:\[[^\]`]*\])?`")


def test_every_test_the_fault_table_names_exists():
    rows = [line for line in (ROOT / "docs" / "faults.md").read_text().splitlines() if line.startswith("| ")]
    named, missing = 0, []
    for row in rows:
        current = None
        for path, name in REFERENCE.findall(row):
            current = path or current
            assert current, f"'::{name}' without a file before it in: {row}"
            source = (ROOT / "tests" / current).read_text()
            named += 1
            if not re.search(rf"^def {name}\(", source, flags=re.MULTILINE):
                missing.append(f"{current}::{name}")
    assert named > 40 and not missing, missing
