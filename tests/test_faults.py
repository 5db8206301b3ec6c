"""Fault injection: ``peftlab train`` killed with SIGKILL at chosen points of its writes, then resumed.

Each run (the tiny BERT of ``test_cli``, 32 training rows, 4 steps, checkpoints at steps 2 and 4) runs in a
process of its own with ``PEFTLAB_FAULT_POINT`` naming where it must die: the runner's ``fault_point`` kills the
process there with SIGKILL. The process calls ``fault_point`` just before every ``os.replace`` (``rename:<file>``:
the temporary file of an atomic write is complete, the rename is not done) and every ``torch.save``
(``save:<file>``: the checkpoint files before it are
written, it and those after are not) and the training curve's ``savefig`` (``plot:<file>``: the final adapter is
written, the metrics are not), ``<file>`` relative to the run folder. After the kill, every file in the
folder must be absent or complete, and ``--resume`` (or a plain rerun) must finish the run with exactly the
requested steps and leave no temporary file behind. The killed runs are forked from one process that imported
peftlab once and run together: the module takes about 30 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_classifier, write_keyword_csv

from peftlab.cli import main

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the killed runs are forked (POSIX)")
STEPS = 4

# name: (fault point, how the run is finished afterwards, the step it continues from; what the kill leaves)
FAULTS = {
    "run-config": ("rename:run_config.json", "rerun", 0),  # only peftlab's leftovers: the folder counts as empty
    "first-checkpoint": ("rename:checkpoint-2/adapter_model.safetensors", "resume", 0),  # no complete checkpoint
    "checkpoint-files": ("save:checkpoint-4/optimizer.pt", "resume", 2),  # checkpoint-4 without optimizer, state
    "final-adapter": ("rename:adapter_model.safetensors", "resume", STEPS),  # trained; the final adapter half-written
    "final-save": ("plot:training_curve.png", "resume", STEPS),  # the final adapter written, the metrics not
    "metrics": ("rename:metrics.json", "resume", STEPS),  # everything but metrics.json
}

# One process imports peftlab once and forks a child per fault (so six runs cost one start-up). A child runs
# ``peftlab train`` with a fault point before each rename and torch.save into its run folder; the parent prints
# the children's exit codes (``-9``: killed) as JSON.
RUNNER = """
import json, os, signal, sys
from pathlib import Path

import torch
from matplotlib.figure import Figure

import peftlab.recipes.text.classification
from peftlab.cli import main


def fault_point(name):
    if os.environ.get("PEFTLAB_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def train(point, out, argv):
    os.environ["PEFTLAB_FAULT_POINT"] = point
    out = Path(out).resolve()

    def with_point(verb, write):
        def wrapped(first, second, *args, **kwargs):
            try:
                target = Path(second).resolve().relative_to(out).as_posix()
            except (TypeError, ValueError):
                target = None
            if target is not None:
                fault_point(f"{verb}:{target}")
            return write(first, second, *args, **kwargs)
        return wrapped

    os.replace = with_point("rename", os.replace)
    torch.save = with_point("save", torch.save)
    Figure.savefig = with_point("plot", Figure.savefig)  # (figure, file): the training curve, after the adapter
    return main(argv)


children = {}
for point, out, log, argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = train(point, out, argv)
        finally:
            os._exit(code)
    children[pid] = out
codes = {}
for _ in children:
    pid, status = os.wait()
    codes[children[pid]] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
print(json.dumps(codes))
"""


def train_args(root: Path, out: Path) -> list[str]:
    """Batch 4 on 32 rows: an epoch is 8 steps, so the run ends mid-epoch (where HF, resumed, trains one step more)."""
    return ["train", "--model", str(root / "model"), "--data", str(root / "small.csv"), "--method", "lora",
            "--max-steps", str(STEPS), "--eval-steps", "2", "--batch-size", "4", "--no-initial-eval",
            "--output-dir", str(out)]


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Every fault's run, started together and killed at its point: name -> (folder, exit code, stderr)."""
    root = tmp_path_factory.mktemp("faults")
    save_tiny_classifier(root / "model")
    write_keyword_csv(root / "small.csv", 40, seed=1)
    runs = [(point, str(root / name), str(root / f"{name}.log"), train_args(root, root / name))
            for name, (point, _, _) in FAULTS.items()]
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(runs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # kill the runner and every child it forked
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    codes = json.loads(stdout.splitlines()[-1])
    return {name: (root / name, codes[str(root / name)], (root / f"{name}.log").read_text()) for name in FAULTS}


def assert_files_complete(out: Path) -> None:
    """Every file is complete: JSON parses, safetensors and torch files load; temporary and lock files aside."""
    from safetensors.torch import load_file

    for path in out.rglob("*"):
        if not path.is_file() or path.name.endswith(".tmp") or path.name == ".peftlab.lock":
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            torch.load(path, weights_only=False)
        elif path.suffix == ".png":
            assert path.read_bytes()[:4] == b"\x89PNG", path


def temporaries(out: Path) -> list[Path]:
    return sorted(out.rglob("*.tmp"))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_run_killed_at_a_fault_point_is_finished_by_resume(fault, killed, capsys):
    point, finish, continued_from = FAULTS[fault]
    out, code, stderr = killed[fault]
    assert code == -signal.SIGKILL, f"the run was not killed at {point}:\n{stderr[-3000:]}"
    assert_files_complete(out)
    assert not (out / "metrics.json").is_file()
    assert (out / ".peftlab.lock").is_file()  # the killed run's lock file stays; its lock went with the process
    if point.startswith("rename:"):  # the temporary file of the interrupted write is there
        assert any(p.name.startswith(f".{Path(point[7:]).name}.") for p in temporaries(out)), temporaries(out)
    if fault == "final-adapter":  # evaluation says the run has no adapter yet
        assert main(["eval", "--adapter", str(out)]) == 2
        assert "has no adapter yet" in capsys.readouterr().err

    resume = ["--resume"] if finish == "resume" else []
    assert main([*train_args(out.parent, out), *resume]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS  # exactly the requested steps, never one more
    assert metrics["resumed_from_step"] == continued_from and metrics["steps_this_run"] == STEPS - continued_from
    assert not temporaries(out)
    assert not (out / ".peftlab.lock").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((p / "trainer_state.json").is_file() for p in out.glob("checkpoint-*"))
    assert_files_complete(out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_curve.png").is_file()
