"""Recipe runs shared by the recipe tests: each runs once per test session, also under pytest-xdist.

A run is keyed by name and written under a folder every xdist worker of the session sees; a
file lock makes the first worker that needs it run it while the others wait and then read its
files. Tests compare what the runs wrote (checkpoints, logs, exports), never in-memory models,
so it does not matter which worker ran them. Tests must not change a shared run's folder: copy
what they damage or extend.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

FAST = ["--preset", "random", "--grid-seeds", "0", "--diversity-seeds", "2"]
EMA = ["--ema-decay", "0.9"]
RUNS = {
    # 4 steps, checkpoints at 2 and 4, grid and diversity at 4, export (EMA weights)
    "straight": ["--max-steps", "4", "--checkpoint-every", "2", *EMA],
    # its first 2 steps, a checkpoint after each, nothing sampled
    "half": ["--max-steps", "2", "--checkpoint-every", "1", "--sample-every", "0", *EMA],
}


@pytest.fixture(scope="session")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``recipe_run(name)``: the output folder of ``add_sdxl.main`` with ``RUNS[name]`` (tiny preset).

    Its stdout is kept in ``stdout.txt`` inside the folder.
    """
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above the workers' own
    root = shared / "recipe-runs"
    root.mkdir(exist_ok=True)

    def run(name: str) -> Path:
        import add_sdxl  # examples/ is on pytest's pythonpath

        out = root / name
        with FileLock(str(root / f"{name}.lock")):
            if not (out / "run.done").is_file():
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                stdout = io.StringIO()
                with contextlib.redirect_stdout(stdout):
                    add_sdxl.main([*FAST, "--output-dir", str(out), *RUNS[name]])
                (out / "stdout.txt").write_text(stdout.getvalue())
                (out / "run.done").write_text("")
        return out

    return run
