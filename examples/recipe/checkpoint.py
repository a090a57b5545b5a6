"""Checkpoints of ``add_sdxl.py``: complete or absent, verified on save and on load.

A checkpoint is written into ``checkpoints/.tmp-step-N/`` by every process (accelerate: the
student and the RNG states of each process, the fp16 scaler; ``--fsdp``: one shard of the
student and its optimiser per process), then the main process writes the discriminator, the
optimisers, schedulers, EMA, counters and (``--method dmd2``) the fake score with its optimiser, checks that every expected file is there and not
empty, lists every file with its size in ``manifest.json`` and renames the folder to
``checkpoints/step-N/`` (atomic on POSIX). A crash or a full disk before the rename leaves the
previous checkpoint as the newest complete one.

Loading verifies the manifest (every listed file present with its size; one
``random_states_<i>.pkl`` per process that wrote it) and that the run is set up like the one
that wrote it (``--fsdp``, ``--ema-decay``, ``--lora-rank``, ``--method dmd2``, fp16 scaling). Every refusal names
the folder. ``--resume latest`` takes the newest complete checkpoint and says which incomplete
ones it passed over.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import recipe.fsdp as fsdp
from recipe.args import RecipeError

if TYPE_CHECKING:
    from recipe.step import RunState

PREFIX = "step-"
MANIFEST = "manifest.json"
_LAYOUT_FLAGS = {"fsdp": "--fsdp", "ema": "--ema-decay", "lora": "--lora-rank", "fake_score": "--method dmd2"}
FAKE_SCORE_FILES = ["fake_score.pt", "optimizer_fake_score.pt", "scheduler_fake_score.pt"]


def layout(
    *, processes: int, fsdp: bool, ema: bool, lora: bool, scaler: bool, fake_score: bool = False
) -> dict[str, Any]:
    """What a checkpoint holds: the number of processes that wrote it and its optional parts."""
    return {
        "processes": processes, "fsdp": fsdp, "ema": ema, "lora": lora, "scaler": scaler,
        "fake_score": fake_score,
    }  # fmt: skip


def run_layout(state: RunState) -> dict[str, Any]:
    """The `layout` of a running state (read: ``accelerator``, ``fsdp``, ``ema``, ``scaling``, ``args``)."""
    return layout(
        processes=state.accelerator.num_processes,
        fsdp=state.fsdp,
        ema=state.ema is not None,
        lora=bool(getattr(state.args, "lora_rank", 0)),
        scaler=state.scaling.scaler is not None,
        fake_score=getattr(state, "fake", None) is not None,
    )


def expected_files(lay: dict[str, Any]) -> list[str]:
    """The files a checkpoint of layout ``lay`` must hold."""
    files = [f"random_states_{i}.pkl" for i in range(lay["processes"])]
    files += ["progress.json", "discriminator.pt", "optimizer_discriminator.pt"]
    files += ["scheduler_student.pt", "scheduler_discriminator.pt"]
    if lay["fsdp"]:
        files += ["student/.metadata"] + [f"student/__{i}_0.distcp" for i in range(lay["processes"])]
    else:
        files += ["model.safetensors", "optimizer_student.pt"]
    files += ["ema.pt"] * lay["ema"] + ["scaler.pt"] * lay["scaler"]
    files += FAKE_SCORE_FILES * lay.get("fake_score", False)  # written before --method existed: absent
    return files


def _objects(state: RunState) -> dict[str, Any]:
    """State written by the main process as ``<name>.pt`` (the same on every process)."""
    objects = {
        "discriminator": state.discriminator,
        "optimizer_discriminator": state.opt_d,
        "scheduler_student": state.sched_g,
        "scheduler_discriminator": state.sched_d,
    }
    if not state.fsdp:
        objects["optimizer_student"] = state.opt_g
    if state.ema is not None:
        objects["ema"] = state.ema
    fake = getattr(state, "fake", None)
    if fake is not None:  # --method dmd2: the fake score's trained weights, optimiser and schedule
        objects.update(
            fake_score=fake, optimizer_fake_score=fake.optimizer, scheduler_fake_score=fake.scheduler
        )
    return objects


# ---------------------------------------------------------------------------------------------
# Finding and checking
# ---------------------------------------------------------------------------------------------
def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders (``step-N``, complete or not), oldest first; ``.tmp-*`` leftovers are ignored."""
    found = [
        p
        for p in (Path(output_dir) / "checkpoints").glob(f"{PREFIX}*")
        if p.is_dir() and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is."""
    if not folder.is_dir():
        return "no such folder"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, lay = manifest["files"], manifest["layout"]
    except FileNotFoundError:
        return f"no {MANIFEST} (its save did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name in expected_files(lay):
        if name not in files:
            return f"{name} is not in {MANIFEST}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated?)"
    return None


def resolve_resume(resume: str, output_dir: Path, say: Callable[[str], None] = print) -> Path:
    """The checkpoint ``--resume`` names; ``latest`` falls back to the newest complete one.

    Raises:
        RecipeError: naming the folder and what is wrong with it.
    """
    if resume != "latest":
        folder = Path(resume)
        why = problem(folder)
        if why is not None:
            raise RecipeError(f"--resume {folder}: not a complete checkpoint: {why}")
        return folder
    root = Path(output_dir) / "checkpoints"
    passed = []
    for folder in reversed(checkpoints(output_dir)):
        why = problem(folder)
        if why is None:
            if passed:
                say(f"add_sdxl: --resume latest: {'; '.join(passed)}; resuming from {folder}")
            return folder
        passed.append(f"skipping {folder} ({why})")
    if not passed:
        raise RecipeError(f"--resume latest: no checkpoint in {root}")
    raise RecipeError(f"--resume latest: no complete checkpoint in {root}: {'; '.join(passed)}")


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def save_checkpoint(state: RunState, output_dir: Path, keep: int, last: Path | None) -> Path:
    """Write ``checkpoints/step-N`` completely or not at all (collective); keep the newest ``keep``.

    Args:
        state: the run.
        output_dir: ``--output-dir``.
        keep: complete checkpoints to keep (0 = all).
        last: the previous checkpoint, named when this one fails.

    Raises:
        RecipeError: when any process failed to write (the disk is full, ...); the partial
            folder is removed and the previous checkpoint stays.
    """
    acc, step = state.accelerator, state.progress.step
    root = Path(output_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    error = _attempt(lambda: _write(state, tmp))
    if not _failed_anywhere(acc, error) and acc.is_main_process:
        error = _attempt(lambda: _seal(state, tmp, final, keep))
    if _failed_anywhere(acc, error):
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {last} is kept" if last else "no earlier checkpoint exists"
        if error is None:
            raise RecipeError(f"saving {final} failed on another process; {kept}")
        what = "the disk is full" if _disk_full(error) else f"{type(error).__name__}: {error}"
        raise RecipeError(
            f"cannot save the checkpoint {final}: {what}; {kept} (free space, then --resume latest)"
        )
    return final


def _write(state: RunState, tmp: Path) -> None:
    acc = state.accelerator
    acc.save_state(str(tmp))  # student (DDP/plain), RNG states of every process, fp16 scaler
    if state.fsdp:
        fsdp.save(state.student, state.opt_g, tmp / "student")
    if acc.is_main_process:
        for name, obj in _objects(state).items():
            torch.save(obj.state_dict(), tmp / f"{name}.pt")
        (tmp / "progress.json").write_text(json.dumps(state.progress.state_dict()))


def _seal(state: RunState, tmp: Path, final: Path, keep: int) -> None:
    """Main process: check the files, write the manifest, rename into place, prune."""
    lay = run_layout(state)
    empty = [f for f in expected_files(lay) if not (tmp / f).is_file() or (tmp / f).stat().st_size == 0]
    if empty:
        raise RecipeError(f"the checkpoint {tmp} lacks {empty} after writing")
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"step": state.progress.step, "layout": lay, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving a step (after a resume): move the old one aside first
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)  # atomic on POSIX: the checkpoint appears complete or not at all
    complete = [p for p in checkpoints(final.parent.parent) if problem(p) is None]
    for stale in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(stale)


def _attempt(write: Callable[[], None]) -> BaseException | None:
    try:
        write()
    except Exception as err:  # noqa: BLE001 - reported on every process below: none is left waiting
        return err
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException
        if type(err).__name__ != "CheckpointException":
            raise
        return err
    return None


def _failed_anywhere(accelerator: Any, error: BaseException | None) -> bool:
    flag = torch.tensor([float(error is not None)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum") > 0)


def _disk_full(error: BaseException) -> bool:
    seen: list[BaseException] = [error]
    while seen:
        err = seen.pop()
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen += [e for e in (err.__cause__, err.__context__) if e is not None]
        seen += [e for e in getattr(err, "failures", {}).values() if isinstance(e, BaseException)]
    return False


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def check_compatible(folder: Path, now: dict[str, Any], say: Callable[[str], None] = print) -> None:
    """Refuse a checkpoint written by a run set up differently (before any model is built).

    Args:
        folder: a complete checkpoint (see `problem`).
        now: the `layout` of this run.
        say: where to print a note (resuming with another number of processes).

    Raises:
        RecipeError: naming the folder and the flag that differs.
    """
    saved = json.loads((folder / MANIFEST).read_text())["layout"]
    for key, flag in _LAYOUT_FLAGS.items():
        if saved.get(key, False) != now.get(key, False):
            written = "with" if saved.get(key, False) else "without"
            raise RecipeError(
                f"--resume {folder}: it was written {written} {flag}; resume with the same setting"
            )
    if now["scaler"] and not saved["scaler"]:
        raise RecipeError(
            f"--resume {folder}: it holds no fp16 loss scale; resume with its --mixed-precision"
        )
    if saved["processes"] != now["processes"]:
        say(
            f"add_sdxl: {folder} was written by {saved['processes']} processes, resumed by {now['processes']}: "
            "the data continues at the same sample, the random streams of the processes differ (not bit-exact)"
        )


def load_checkpoint(state: RunState, folder: Path, say: Callable[[str], None] = print) -> None:
    """Restore the run from ``folder`` after `problem` and `check_compatible` (collective under ``--fsdp``).

    Raises:
        RecipeError: naming the folder, for an incomplete checkpoint, a different setup, or a
            file that cannot be read.
    """
    why = problem(folder)
    if why is not None:
        raise RecipeError(f"--resume {folder}: not a complete checkpoint: {why}")
    check_compatible(folder, run_layout(state), say)
    try:
        state.accelerator.load_state(str(folder))
        if state.fsdp:
            fsdp.load(state.student, state.opt_g, folder / "student")
        for name, obj in _objects(state).items():
            obj.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        state.progress.load_state_dict(json.loads((folder / "progress.json").read_text()))
    except Exception as err:
        raise RecipeError(f"--resume {folder}: cannot load it ({type(err).__name__}: {err})") from err
