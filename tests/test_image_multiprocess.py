"""Image runs on two CPU processes (``accelerate launch --multi_gpu --num_processes 2``, gloo) of the tiny pipeline
of tests/test_image_recipes.py: both processes end with the same adapters although each drew its own examples,
only the main process writes the run folder, and ``--resume`` continues a killed two-process run to the same
end, bit for bit. Each launch starts two Python processes (about half a minute each on a busy 2-core machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from conftest import tiny_sd_pipeline
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.recipes import image_training as it
from peftlab.recipes.rundir import checkpoint_folders

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).parent / "workers" / "image_launch.py"
SIZE = 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(unet_widths=(16, 32), vae_widths=(8, 16), norm_groups=8, latent_size=8,
                     image_size=SIZE).save_pretrained(folder)
    return folder


def train_args(base_dir, out) -> list[str]:
    return ["train", "--task", "subject-driven", "--model", str(base_dir), "--instance-data", "glyph:K",
            "--instance-prompt", "a photo of sks glyph", "--prior-loss-weight", "0", "--method", "lora", "--r", "2",
            "--batch-size", "2", "--max-steps", "4", "--eval-steps", "2", "--inference-steps", "2",
            "--num-eval-images", "2", "--output-dir", str(out)]


def launch(args: list[str], dump: Path, kill_after: int = 0) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``peftlab train`` on 2 CPU processes; each writes its adapters to ``dump``."""
    dump.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PEFTLAB_TEST_DUMP": str(dump),
           "PEFTLAB_TEST_KILL_AFTER": str(kill_after)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:  # kill the launcher and both workers, never leave orphans behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def straight(base_dir, tmp_path_factory):
    """An uninterrupted 4-step run on 2 processes: (run folder, {rank: adapters at the end})."""
    root = tmp_path_factory.mktemp("straight")
    done = launch(train_args(base_dir, root / "run"), root / "dump")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", {k: load_file(root / "dump" / f"rank{k}.safetensors") for k in (0, 1)}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_two_processes_end_with_the_same_adapters_and_one_run_folder(straight):
    out, ranks = straight
    assert_same(ranks[1], ranks[0])  # gradients averaged over the processes
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in ranks[0].items())  # trained
    assert [p.name for p in checkpoint_folders(out)] == ["checkpoint-4"]
    checkpoint = out / "checkpoint-4"
    assert_same(load_file(checkpoint / it.CHECKPOINT_WEIGHTS), ranks[0])
    names = {p.name for p in checkpoint.iterdir()}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl", "pipeline.json", "unet",
            "sampling_generator_0.safetensors", "sampling_generator_1.safetensors"} <= names
    assert not any(name.startswith("model") for name in names)  # the adapters only, never the UNet
    draws = [load_file(checkpoint / f"sampling_generator_{k}.safetensors")["state"] for k in (0, 1)]
    assert not torch.equal(*draws)  # each process drew its own examples and noise
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and "subject_similarity" in metrics["test"]
    assert (out / "samples.png").is_file() and (out / "pipeline.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no leftovers, no lock


def test_a_killed_two_process_run_resumes_to_the_same_end(straight, base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    killed = launch(train_args(base_dir, out), tmp_path / "killed", kill_after=2)
    assert killed.returncode != 0
    assert [p.name for p in checkpoint_folders(out)] == ["checkpoint-2"] and not (out / "metrics.json").exists()
    # a single process cannot continue it: the schedule and the random draws are per process
    assert main([*train_args(base_dir, out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written by 2 process(es) and this run has 1" in err, err
    resumed = launch([*train_args(base_dir, out), "--resume"], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'} (step 2 of 4)" in resumed.stdout
    ranks = {k: load_file(tmp_path / "resumed" / f"rank{k}.safetensors") for k in (0, 1)}
    assert_same(ranks[0], straight[1][0])
    assert_same(ranks[1], straight[1][0])
    first, second = (json.loads((run / "metrics.json").read_text()) for run in (straight[0], out))
    assert second["final_loss"] == first["final_loss"] and second["test"] == first["test"]
