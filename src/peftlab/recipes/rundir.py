"""The run folder: what a training run writes, the rules that keep an earlier result from being lost, and its lock.

Design notes: ``docs/design.md``, section peftlab.recipes.rundir.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftlab import files
from peftlab._version import __version__
from peftlab.errors import RecipeError
from peftlab.recipes.adapters import FULL
from peftlab.recipes.options import NOT_IDENTITY, RunOptions
from peftlab.saving import TRAINER_STATE_NAME

RUN_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
CURVE_FILE = "training_curve.png"
LOCK_FILE = ".peftlab.lock"
TRAINER_STATE = TRAINER_STATE_NAME  # HF writes it last into a checkpoint: the checkpoint is complete once it reads
EMPTY, IN_PROGRESS, FINISHED, FOREIGN = "empty", "in progress", "finished", "not a peftlab run"


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` (the run's last file: the folder is a finished run once it is there); numbers that
    JSON cannot hold (tensors, NaN, inf) are written as plain numbers or strings."""
    files.atomic_write_json(out / METRICS_FILE, metrics)


def is_main_process() -> bool:
    """True on global rank 0 of a ``torchrun`` / ``accelerate launch`` run (``$RANK``), and in a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / files.CONFIG_NAME).is_file()


def is_leftover(path: Path) -> bool:
    """A file peftlab may leave behind when killed: the lock file, a temporary file of an atomic write."""
    return path.name == LOCK_FILE or (files.TEMPORARY_FILE.fullmatch(path.name) is not None and path.is_file())


def read_run(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run_config.json`` of a run folder, or ``None``."""
    file = Path(path) / RUN_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecipeError(f"{file} is not valid JSON; the run folder is damaged") from None
    return data if isinstance(data, dict) else None


def saved_run_options(path: str | os.PathLike) -> RunOptions | None:
    """The options a saved run was trained with (``None`` for a folder not written by a recipe)."""
    data = read_run(path)
    return RunOptions.from_dict(data["options"]) if data and "options" in data else None


def base_model_name(adapter_dir: str | os.PathLike, model: str | None = None) -> str:
    """The base model of a saved adapter: ``model`` if given, else the run's ``--model``, else the adapter config's."""
    if model:
        return model
    options = saved_run_options(adapter_dir)
    if options is not None and options.model:
        return options.model
    if is_adapter_dir(adapter_dir):
        name = files.read_json(Path(adapter_dir) / files.CONFIG_NAME).get("base_model_name_or_path")
        if name:
            return str(name)
    raise RecipeError(f"{adapter_dir} does not record its base model; pass --model")


def folder_state(path: str | os.PathLike) -> str:
    """``EMPTY``, ``IN_PROGRESS``, ``FINISHED`` (``metrics.json`` written) or ``FOREIGN`` (not a peftlab run)."""
    out = Path(path)
    if not out.is_dir() or all(is_leftover(p) for p in out.iterdir()):
        return EMPTY
    if read_run(out) is None:
        return FOREIGN
    return FINISHED if (out / METRICS_FILE).is_file() else IN_PROGRESS


def is_complete_checkpoint(path: Path) -> bool:
    try:
        return "global_step" in json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False


def checkpoint_folders(path: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders of a run, by step."""
    found = [p for p in Path(path).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def remove_checkpoints(path: str | os.PathLike) -> None:
    """Delete every ``checkpoint-<step>`` folder of a run (a finished run that need not keep them)."""
    for checkpoint in checkpoint_folders(path):
        shutil.rmtree(checkpoint, ignore_errors=True)


def last_checkpoint(path: str | os.PathLike) -> str | None:
    """The last complete checkpoint of a run (a checkpoint whose save was cut short is skipped)."""
    complete = [p for p in checkpoint_folders(path) if is_complete_checkpoint(p)]
    return str(complete[-1]) if complete else None


class RunFinished(Exception):
    """``--resume`` found the run finished: nothing to do. Not an error: :func:`owns_output_dir` returns ``metrics``."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={options.get(k)}" for k in ("task", "method", "model", "data", "r", "seed"))


def _budget_reached(old: dict[str, Any], new: RunOptions, global_step: int) -> bool:
    """Whether a finished run already trained as long as ``new`` asks (``--max-steps``, else ``--epochs``)."""
    if new.max_steps:
        return global_step >= new.max_steps
    return not old.get("max_steps") and new.epochs <= old.get("epochs", 1.0)


def check_output_dir(options: RunOptions, kind: str = "train", main_process: bool | None = None) -> str | None:
    """Check that the run may use ``options.output_dir``; return the checkpoint to resume from.

    Read-only. An existing folder is refused unless it is empty (peftlab's own leftovers do not count), or
    ``overwrite`` is set and it holds a peftlab run (a folder peftlab did not write is never deleted), or
    ``resume`` is set and it holds the same run. ``resume`` of a finished run with the same budget raises
    :class:`RunFinished`; of an unfinished run without a complete checkpoint it returns ``None`` (start at step 0).
    Every rank of a distributed run answers ``resume`` alike; whether a new run may use the folder is decided by
    the main process alone (``main_process``, default :func:`is_main_process`), as the others would see its writes.
    """
    out = Path(options.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--output-dir {out} exists and is a file, not a folder")
    if options.resume and kind != "train":
        raise RecipeError(f"--resume is not supported by peftlab {kind}")
    main = is_main_process() if main_process is None else main_process
    state = folder_state(out)
    if state == EMPTY:
        if options.resume:
            raise RecipeError(f"--resume: {out} holds no run to resume; start it without --resume")
        return None
    previous = read_run(out)
    if options.resume:
        if previous is None or "options" not in previous:
            raise RecipeError(f"--resume: {out} holds no peftlab run (no {RUN_FILE}); nothing to resume")
        old, new = previous["options"], options.to_dict()
        diffs = [k for k in new if k not in NOT_IDENTITY and old.get(k) != new[k]]
        if diffs:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diffs)
            raise RecipeError(f"--resume: {out} holds a different run ({changes}); resume it with its own options")
        checkpoint = last_checkpoint(out)
        if state == FINISHED:
            metrics = files.read_json(out / METRICS_FILE)
            step = int(metrics.get("global_step", 0))
            if _budget_reached(old, options, step):
                raise RunFinished(
                    f"peftlab train: {out} already finished (global step {step}, {METRICS_FILE} written); nothing to "
                    "resume. Pass a larger --max-steps with --resume to train longer, or --overwrite to start again",
                    metrics,
                )
            if checkpoint is None:
                raise RecipeError(f"--resume: {out} holds a finished run whose checkpoints were removed, so it cannot "
                                  "train longer; rerun with --overwrite to start again")
        elif checkpoint is None and main:
            print(f"peftlab train: {out} has no complete checkpoint yet; the run starts again from step 0", flush=True)
        return checkpoint
    if not main:
        return None
    if previous is None:
        raise RecipeError(
            f"--output-dir {out} is not empty and holds no peftlab run; choose another folder "
            "(peftlab never deletes a folder it did not write, even with --overwrite)"
        )
    if not options.overwrite:
        same = previous.get("options", {}).get("method") == options.method and previous.get("kind") == kind
        what = "an earlier result of this method" if same else "a different run"
        raise RecipeError(
            f"--output-dir {out} already holds {what} ({_describe(previous.get('options', {}))}); pass --overwrite "
            "to replace it, --resume to continue it, or choose another --output-dir"
        )
    return None


def start_output_dir(
    options: RunOptions, kind: str = "train", main_process: bool = True, extra: dict[str, Any] | None = None
) -> Path:
    """Prepare the folder and write ``run_config.json`` (+ ``extra``); only on the main process.

    ``overwrite`` empties a peftlab run folder (all but the lock file). While this process holds the folder's lock,
    peftlab's stale temporary files and incomplete checkpoints (leftovers of a killed run) are removed.
    """
    out = Path(options.output_dir)
    if main_process:
        if options.overwrite and out.is_dir() and read_run(out) is not None:
            for path in out.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.name != LOCK_FILE:
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() in _HELD:
            remove_leftovers(out)
        record = {"kind": kind, "peftlab_version": __version__, "options": options.to_dict(), **(extra or {})}
        if options.resume and (previous := read_run(out)):
            record["resumed"] = [*previous.get("resumed", []), time.strftime("%Y-%m-%d %H:%M:%S")]
        files.atomic_write_json(out / RUN_FILE, record)
    return out


def remove_leftovers(out: Path) -> None:
    """Delete what a killed run left behind: temporary files of atomic writes, checkpoints whose save was cut short."""
    for path in out.rglob(".*.tmp"):
        if files.TEMPORARY_FILE.fullmatch(path.name) and path.is_file():
            path.unlink()
    for checkpoint in checkpoint_folders(out):
        if not is_complete_checkpoint(checkpoint):
            shutil.rmtree(checkpoint)


# -- the lock ---------------------------------------------------------------------------------------------------------
_HELD: dict[Path, Any] = {}  # folder (resolved) -> the FileLock this process holds on it


@contextmanager
def lock_output_dir(path: str | os.PathLike, main_process: bool | None = None) -> Iterator[Path]:
    """Hold the lock of a run folder (``<folder>/.peftlab.lock``) for a block; the folder is created if needed.

    Never waits: if another process holds it, ``RecipeError`` at once. Only the main process of a distributed
    run takes it (``main_process``, default :func:`is_main_process`); re-entrant within a process. On release
    the lock file is deleted, and so is a folder this call created if nothing was written into it. A killed
    process leaves the lock file; the OS has released its lock, and the file counts as a leftover.
    """
    from filelock import FileLock, Timeout

    out = Path(path)
    if not (is_main_process() if main_process is None else main_process) or out.resolve() in _HELD:
        yield out
        return
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--output-dir {out} exists and is a file, not a folder")
    created = [p for p in (out, *out.parents) if not p.exists()]  # the folders made here, innermost first
    out.mkdir(parents=True, exist_ok=True)
    key, lock = out.resolve(), FileLock(out / LOCK_FILE)
    try:
        lock.acquire(timeout=0)  # one attempt: a run never waits for another
    except Timeout:
        raise RecipeError(
            f"--output-dir {out}: another peftlab run is using it (it holds {out / LOCK_FILE}); wait until that run "
            "ends, or choose another --output-dir"
        ) from None
    _HELD[key] = lock
    try:
        yield out
    finally:
        del _HELD[key]
        (out / LOCK_FILE).unlink(missing_ok=True)  # contenders never wait for the lock, so no one waits on this file
        lock.release()
        for folder in created:  # a run that wrote nothing leaves no folder behind
            try:
                folder.rmdir()
            except OSError:  # not empty (or another run took it meanwhile)
                break


def owns_output_dir(
    train: Callable[[RunOptions, str | None], dict[str, Any]],
) -> Callable[[RunOptions], dict[str, Any]]:
    """Make a recipe's ``train(options, checkpoint)`` into ``train(options)``: the options are resolved, the run
    holds its output folder's lock from start to end, the folder is checked (:func:`check_output_dir`, which
    gives the checkpoint to resume from, or ``None``), and ``--resume`` of a finished run returns the run's
    metrics (with a message) instead of training."""

    @functools.wraps(train)
    def run(options: RunOptions) -> dict[str, Any]:
        options = options.resolved()
        with lock_output_dir(options.output_dir):
            try:
                return train(options, check_output_dir(options))
            except RunFinished as done:
                if is_main_process():
                    print(str(done), flush=True)
                return done.metrics

    return run


def check_trained(folder: str | os.PathLike) -> None:
    """Refuse a run folder whose final adapter (or model) is not written yet, saying how to finish it."""
    folder = Path(folder)
    run = read_run(folder)
    if run is None or run.get("kind") != "train" or is_adapter_dir(folder) or (folder / "config.json").is_file() or (
            folder / "pipeline.json").is_file():
        return
    what = "model" if run.get("options", {}).get("method") == FULL else "adapter"
    last = last_checkpoint(folder)
    hint = f"; to evaluate its last checkpoint, pass --adapter {last}" if last else ""
    raise RecipeError(f"{folder} holds a peftlab run that has no {what} yet (it stopped before its final save); "
                      f"`peftlab train --resume` with the same options finishes it{hint}")
