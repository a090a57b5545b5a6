"""The toy study's flow rows in ``--quick`` mode: a rectified-flow teacher and its ADD / LADD students.

Runs ``examples/add_toy.py --flow --quick`` in a subprocess (fixed seeds, deterministic
algorithms, one thread) and reads ``results_flow.json``: every row is there with finite metrics,
the teacher's 4 Euler steps beat its single step, and the one-step students draw the asked-for
digit most of the time. Quick mode trains too briefly to rank the students (the full study's
rows are in ``docs/results.md``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from toy.flow import LADD_MEAN  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "add_toy.py"


@pytest.mark.slow
def test_quick_flow_study_writes_every_row(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--flow", "--quick", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {
        (r["row"], r["steps"]): r["metrics"]
        for r in json.loads((tmp_path / "results_flow.json").read_text())["rows"]
    }
    ladd = f"LADD (grid heads told t̂, m = {LADD_MEAN:g})"
    expected = {("flow teacher (Euler)", 4), ("flow teacher (Euler)", 1)}
    expected |= {(name, n) for name in ("ADD (flow teacher)", ladd) for n in (1, 4)}
    assert set(rows) == expected
    assert all(math.isfinite(m[k]["mean"]) for m in rows.values() for k in ("fd", "acc", "div"))
    assert rows[("flow teacher (Euler)", 4)]["fd"]["mean"] < rows[("flow teacher (Euler)", 1)]["fd"]["mean"]
    for name in ("ADD (flow teacher)", ladd):
        assert rows[(name, 1)]["acc"]["mean"] > 0.5
    for png in ("samples_flow.png", "curves_flow.png"):
        assert (tmp_path / png).stat().st_size > 0
