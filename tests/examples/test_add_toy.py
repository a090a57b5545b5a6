"""The toy study's ``--quick`` mode: the 1-step ADD student beats the teacher's 1-step samples.

Runs ``examples/add_toy.py --quick`` in a subprocess (fixed seeds, deterministic algorithms,
one thread) and reads its ``results.json``. The run is deterministic; the margin asked for
(10 %) is well inside the measured gap (quick mode: FD 2.19 against 2.83).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "add_toy.py"


def _row(rows: list[dict], name: str, steps: int) -> dict:
    found = [r for r in rows if r["row"].startswith(name) and r["steps"] == steps]
    assert len(found) == 1, f"expected one {name!r} row at {steps} steps, got {[r['row'] for r in rows]}"
    return found[0]["metrics"]


@pytest.mark.slow
def test_quick_study_student_beats_teacher_one_step(tmp_path: Path) -> None:
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    teacher_1 = _row(rows, "teacher", 1)["fd"]["mean"]
    student_1 = _row(rows, "ADD", 1)["fd"]["mean"]
    assert student_1 < 0.9 * teacher_1, f"1-step FD: student {student_1:.3f} vs teacher {teacher_1:.3f}"
    assert _row(rows, "ADD", 1)["acc"]["mean"] > 0.5
    for png in ("samples.png", "curves_add.png"):
        assert (tmp_path / png).stat().st_size > 0
    print(
        f"quick study: {time.time() - start:.0f}s, 1-step FD student {student_1:.3f} teacher {teacher_1:.3f}"
    )
