"""The run folder's guarantees: one run at a time, a clear state (empty / in progress / finished), safe resumption.

Runs go through the command line (``main([...])`` in-process, or ``python -m peftlab.cli`` in a subprocess when two
runs must overlap) on the tiny random BERT of ``test_cli`` and a 40-row keyword CSV (32 training rows).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, save_tiny_classifier, write_keyword_csv

from peftlab.cli import main
from peftlab.recipes.test_items import read_items


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rundir")
    save_tiny_classifier(root / "model")
    return {"root": root, "model": root / "model", "small": write_keyword_csv(root / "small.csv", 40, seed=1)}


def train_args(tiny, out: Path, *extra: str) -> list[str]:
    """A 4-step LoRA run, checkpoints at steps 2 and 4. Batch 4 on 32 rows: an epoch is 8 steps, longer than the run."""
    return ["train", "--model", str(tiny["model"]), "--data", str(tiny["small"]), "--method", "lora",
            "--max-steps", "4", "--eval-steps", "2", "--batch-size", "4", "--no-initial-eval",
            "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tiny) -> Path:
    """A finished 4-step run (copy it before changing it)."""
    out = tiny["root"] / "finished"
    assert main(train_args(tiny, out)) == 0
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


def kill_final_save(out: Path) -> None:
    """Leave ``out`` as a kill just before the final save leaves it: checkpoints, no adapter, no metrics."""
    for path in out.iterdir():
        if path.is_file() and path.name != "run_config.json":
            path.unlink()


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def peftlab_temporaries(out: Path) -> list[Path]:
    """Temporary files of peftlab's atomic writes (``.<name>.<random>.tmp``) anywhere under ``out``."""
    return [p for p in out.rglob(".*.tmp") if p.is_file()]


# -- one run per folder ---------------------------------------------------------------------------------------------
def test_a_second_run_on_a_folder_in_use_fails_at_once(tiny, tmp_path, capsys):
    """Two runs on one --output-dir: while the first runs (frozen with SIGSTOP, so the test does not race it), a
    second one, plain, --overwrite or --resume, stops at once with one line; the first then finishes undisturbed."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "peftlab.cli", *train_args(tiny, out, "--seed", "0")],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "run_config.json").is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)
        assert (out / "run_config.json").is_file() and first.poll() is None, "the first run did not start"
        for extra in ([], ["--overwrite"], ["--resume"]):
            started = time.monotonic()
            assert main(train_args(tiny, out, "--seed", "1", *extra)) == 2
            line = error_line(capsys)
            assert f"--output-dir {out}: another peftlab run is using it" in line, line
            assert time.monotonic() - started < 10  # at once: no waiting for the lock
        os.kill(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, stderr[-3000:]
    assert metrics_of(out)["global_step"] == 4
    assert json.loads((out / "run_config.json").read_text())["options"]["seed"] == 0


def test_the_lock_of_a_killed_run_is_released_by_the_os(tiny, tmp_path):
    """A run killed with SIGKILL cannot release its lock; the OS does, and the lock file it leaves is no obstacle."""
    from peftlab.recipes.rundir import LOCK_FILE

    out = tmp_path / "run"
    holder = ("import os, signal, sys\nfrom peftlab.recipes.rundir import lock_output_dir\n"
              "held = lock_output_dir(sys.argv[1])\nheld.__enter__()\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", holder, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / LOCK_FILE).is_file()
    assert main(train_args(tiny, out, "--max-steps", "2")) == 0
    assert metrics_of(out)["global_step"] == 2


def test_a_failed_start_releases_the_lock_and_leaves_no_folder(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nnice,1\n")
    assert main([*train_args(tiny, out), "--data", str(bad)]) == 2
    assert "missing column" in error_line(capsys)
    assert not out.exists()
    out.mkdir()  # an existing empty folder is kept, and the lock taken in it is released
    assert main([*train_args(tiny, out), "--data", str(bad)]) == 2
    capsys.readouterr()
    assert main(train_args(tiny, out, "--max-steps", "2")) == 0


@pytest.mark.parametrize("folder", ["fresh", "finished"])
def test_ranks_of_a_torchrun_share_one_folder_without_deadlock(tiny, finished, tmp_path, folder):
    """Only the main process takes the folder's lock; every rank agrees that a finished run has nothing to resume."""
    resume = folder == "finished"
    out = copy_run(finished, tmp_path) if resume else tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), "-m", "peftlab.cli", *train_args(tiny, out), *(["--resume"] if resume else [])]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a deadlocked rank: kill the launcher and its workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert metrics_of(out)["global_step"] == 4
    if resume:
        assert "already finished" in stdout
    else:  # the per-item results gathered from both ranks, in the test set's order, as one process evaluates it
        items = read_items(out).rows
        assert len(items) == metrics_of(out)["num_test"]
        assert sum(r["value"] for r in items) / len(items) == pytest.approx(metrics_of(out)["test"]["accuracy"])
        assert main(["eval", "--adapter", str(out), "--items", str(tmp_path / "eval.jsonl")]) == 0
        alone = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
        assert [(r["key"], r["label"]) for r in alone] == [(r["key"], r["label"]) for r in items]


# -- the state of a folder ------------------------------------------------------------------------------------------
def test_resume_of_a_finished_run_does_nothing(tiny, finished, tmp_path, capsys):
    """--resume of a finished run (e.g. a requeued job) exits 0 with a message and changes nothing."""
    out = copy_run(finished, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(train_args(tiny, out, "--resume")) == 0
    stdout = capsys.readouterr().out
    assert "already finished" in stdout and str(out) in stdout and "global step 4" in stdout, stdout
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".peftlab.lock"}
    assert after == before
    assert main(train_args(tiny, out, "--resume", "--max-steps", "6")) == 0  # a larger budget continues it
    assert metrics_of(out)["global_step"] == 6 and metrics_of(out)["resumed_from_step"] == 4


def test_resume_after_a_kill_during_the_final_save_finishes_without_training_past_max_steps(tiny, finished, tmp_path):
    """Training had reached --max-steps (checkpoint-4) when the final save was killed: resuming writes the final
    adapter and metrics from the saved state, with exactly 4 steps, and keeps checkpoint-4 (HF would train a 5th)."""
    out = copy_run(finished, tmp_path)
    expected = metrics_of(out)
    kill_final_save(out)
    assert main([*train_args(tiny, out), "--resume"]) == 0
    metrics = metrics_of(out)
    assert metrics["global_step"] == 4 and metrics["resumed_from_step"] == 4 and metrics["steps_this_run"] == 0
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert metrics["best_checkpoint"] == expected["best_checkpoint"].replace(str(finished), str(out))
    assert metrics["test"]["accuracy"] == expected["test"]["accuracy"]  # the best checkpoint was restored
    assert metrics["test"]["loss"] == pytest.approx(expected["test"]["loss"], abs=1e-5)
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_curve.png").is_file()


def test_a_folder_holding_only_peftlab_leftovers_counts_as_empty(tiny, tmp_path, capsys):
    """A kill while run_config.json was written leaves only a temporary file (and the lock file)."""
    for how in ([], ["--overwrite"]):
        out = tmp_path / f"run{len(how)}"
        out.mkdir()
        (out / ".run_config.json.0a1b2c3d4e5f.tmp").write_text('{"kind": "tr')
        (out / ".peftlab.lock").touch()
        assert main([*train_args(tiny, out), "--resume"]) == 2
        assert "no run to resume" in error_line(capsys)
        assert main([*train_args(tiny, out, "--max-steps", "2"), *how]) == 0
        capsys.readouterr()
        assert metrics_of(out)["global_step"] == 2
        assert not peftlab_temporaries(out)


def test_resume_removes_stale_temporary_files_and_only_those(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    kill_final_save(out)
    stale = [out / ".adapter_model.safetensors.a1b2c3d4e5f6.tmp",
             out / "checkpoint-4" / ".run_config.json.99aa88bb77cc.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    kept = [out / "notes.tmp", out / ".notes"]
    for path in kept:
        path.write_text("mine")
    assert main([*train_args(tiny, out), "--resume"]) == 0
    assert not peftlab_temporaries(out)
    assert all(path.read_text() == "mine" for path in kept)


def test_resume_skips_an_incomplete_checkpoint(tiny, finished, tmp_path):
    """A kill during the save of checkpoint-4 leaves it without trainer_state.json (HF writes that last): resuming
    continues from checkpoint-2 and trains steps 3 and 4 again."""
    out = copy_run(finished, tmp_path)
    kill_final_save(out)
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    assert main([*train_args(tiny, out), "--resume"]) == 0
    metrics = metrics_of(out)
    assert metrics["global_step"] == 4 and metrics["resumed_from_step"] == 2 and metrics["steps_this_run"] == 2
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()


def test_eval_of_a_run_without_its_adapter_says_to_resume_it(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    kill_final_save(out)
    assert main(["eval", "--adapter", str(out)]) == 2
    line = error_line(capsys)
    assert "has no adapter yet" in line and "peftlab train --resume" in line and str(out) in line, line


# -- data -----------------------------------------------------------------------------------------------------------
def test_a_stray_label_stops_the_run_until_num_labels_confirms_it(tiny, tmp_path, capsys):
    """One row labelled 7 among 300 rows of 0/1 would silently make a 3-class problem."""
    from peftlab.recipes.options import RunOptions
    from peftlab.recipes.text.classification import load_data

    data = write_keyword_csv(tmp_path / "stray.csv", 300, labels={150: "7"})
    out = tmp_path / "run"
    assert main(train_args(tiny, out, "--data", str(data))) == 2
    line = error_line(capsys)
    assert "label '7' occurs 1 time" in line and "'1': 150" in line and "--num-labels" in line, line
    assert not out.exists()
    assert main(train_args(tiny, out, "--data", str(data), "--num-labels", "2")) == 2
    assert "out of range" in error_line(capsys)
    _, names = load_data(RunOptions(data=str(data), num_labels=8).resolved())  # confirmed: 7 is a class
    assert names == [str(i) for i in range(8)]
    _, names = load_data(RunOptions(data=str(write_keyword_csv(tmp_path / "ok.csv", 300))).resolved())
    assert names == ["0", "1"]
