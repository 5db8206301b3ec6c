"""Experiment tracking (``--report-to``): a run's loss reaches TensorBoard, read back with TensorBoard's own reader,
for a text run (HF Trainer's TensorBoardCallback) and an image run (accelerate's tracker)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import save_tiny_classifier, write_keyword_csv

from peftlab.cli import main
from peftlab.recipes.options import RunOptions

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(logs: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` event written under ``logs`` (TensorBoard's reader)."""
    found: list[tuple[int, float]] = []
    for folder in sorted({p.parent for p in logs.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            found += [(e.step, e.value) for e in events.Scalars(tag)]
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    save_tiny_classifier(root / "model")
    return {"model": root / "model", "data": write_keyword_csv(root / "data.csv", 40, seed=1)}


def text_run(tiny, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--method", "lora",
                 "--max-steps", "4", "--eval-steps", "2", "--batch-size", "4", "--no-initial-eval",
                 "--output-dir", str(out), *extra])


def test_a_text_run_logs_its_loss_to_tensorboard_by_default(tiny, tmp_path):
    assert RunOptions().resolved().report_to == "tensorboard"  # installed here, so the default
    out = tmp_path / "run"
    assert text_run(tiny, out) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    assert [s for s, _ in logged] == [2, 4]  # logged every 2 steps (the evaluation interval)
    written = scalars(out / "logs", "train/loss")
    assert [s for s, _ in written] == [s for s, _ in logged]
    assert [v for _, v in written] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert scalars(out / "logs", "eval/loss")  # the validation metrics too


def test_report_to_none_writes_no_logs_and_a_missing_tracker_is_a_one_line_error(tiny, tmp_path, capsys):
    assert text_run(tiny, tmp_path / "quiet", "--report-to", "none") == 0
    assert not (tmp_path / "quiet" / "logs").exists()
    assert json.loads((tmp_path / "quiet" / "run_config.json").read_text())["options"]["report_to"] == "none"
    if importlib.util.find_spec("wandb") is None:  # not installed by make test
        capsys.readouterr()
        assert text_run(tiny, tmp_path / "wandb", "--report-to", "wandb") == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "pip install wandb" in err and not (tmp_path / "wandb").exists()


def test_an_image_run_logs_its_loss_to_tensorboard(tmp_path):
    pytest.importorskip("diffusers")
    from conftest import tiny_sd_pipeline
    from test_image_recipes import fixed_batch, options, setup

    from peftlab.recipes.image import training as it

    base = tmp_path / "base"
    tiny_sd_pipeline(unet_widths=(16, 32), vae_widths=(8, 16), norm_groups=8, latent_size=8,
                     image_size=16).save_pretrained(base)
    opts = options(base, "subject-driven", "lora", max_steps=3)
    assert opts.report_to == "tensorboard"
    pipe = it.load_base(opts)
    modules, hook = setup(pipe, opts, control=False)
    batch = fixed_batch(pipe, control=False)
    out = tmp_path / "image-run"
    out.mkdir()
    result = it.fit(pipe, modules, lambda: batch, opts, hook=hook, progress=False, out=out)
    written = scalars(out / "logs", "train/loss")
    assert [s for s, _ in written] == [1, 2, 3]
    assert [v for _, v in written] == pytest.approx(result["losses"], rel=1e-6)
