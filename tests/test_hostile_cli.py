"""Hostile input to the CLI commands other than ``serve``: each case is one ``peftlab <command>: error: ...`` line
with exit code 2, found before any run folder or output is written, or the behaviour a user expects."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_image_recipes import SIZE, class_cache, loaded, options, pipe, setup  # noqa: F401  (fixtures)
from test_recipes import tiny_lm  # noqa: F401  (the module-scoped fixture)

from peftlab.cli import main
from peftlab.data import glyphs


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"peftlab {command}: error:"), err
    return err


# -- 5: data-to-text on a file whose inputs have no triple ------------------------------------------------------------
def test_data_to_text_without_any_triple_is_a_data_error_before_the_run_folder(tiny_lm, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "dart.json"
    data.write_text(json.dumps([{"tripleset": [], "annotations": [{"source": "x", "text": f"text {i}"}]}
                                for i in range(20)]))
    out = tmp_path / "run"
    args = ["train", "--task", "data-to-text", "--model", str(tiny_lm), "--data", str(data), "--method", "lora",
            "--max-steps", "1", "--output-dir", str(out)]
    assert main(args) == 2
    err = one_error_line(capsys, "train")
    assert "no DART input with a triple and a reference" in err
    assert not out.exists()  # no run_config.json left to block the next run
    data.write_text(json.dumps([{"tripleset": [["a", "p", "b"]], "annotations": [{"source": "x", "text": "a p b"}]}]))
    assert main(args) == 2
    assert "1 distinct input(s)" in one_error_line(capsys, "train") and not out.exists()


# -- image runs: generate, control images ------------------------------------------------------------------------
PROMPT = ["--prompt", "a photo of sks dog", "--steps", "2"]


@pytest.fixture
def segmentation_run(pipe, tiny_sd_dir, tmp_path):  # noqa: F811
    """A saved controllable run (HRA adapters + condition encoder, untrained) whose run_config says segmentation."""
    from peftlab.diffusion.pipeline import save_pipeline_adapters

    setup(pipe, options(tiny_sd_dir, "controllable"), control=True)
    run = save_pipeline_adapters(pipe, tmp_path / "run")
    (run / "run_config.json").write_text(json.dumps({"kind": "train", "options": {
        "task": "controllable", "model": str(tiny_sd_dir), "control": "segmentation", "method": "hra"}}))
    return run


def target_png(tmp_path):
    path = tmp_path / "target.png"
    glyphs.to_pil(glyphs.subject_images("K", 1, size=SIZE))[0].save(path)
    return path


def test_generate_refuses_an_absurd_image_count_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", str(tmp_path / "no-such-model"), *PROMPT, "--num-images", "1000000",
                 "--out", str(out)]) == 2
    err = one_error_line(capsys, "generate")
    assert "--num-images 1000000 is over the limit of 256 images per call" in err and "several calls" in err
    assert not list(tmp_path.iterdir())


def test_generate_denoises_batch_size_images_at_a_time(tiny_sd_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    counts = []
    call = StableDiffusionPipeline.__call__

    def counting(self, *args, **kwargs):
        counts.append(kwargs["num_images_per_prompt"])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", str(tiny_sd_dir), *PROMPT, "--num-images", "5", "--batch-size", "2",
                 "--out", str(out)]) == 0
    assert counts == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-0.png", "grid-1.png", "grid-2.png", "grid-3.png",
                                                          "grid-4.png", "grid.png"]


def test_generate_checks_that_out_is_writable_before_generating(tiny_sd_dir, tmp_path, capsys):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["generate", "--model", str(tiny_sd_dir), *PROMPT, "--num-images", "1"]
    assert main([*args, "--out", str(blocker / "sub" / "grid.png")]) == 2
    assert f"{blocker} is a file, not a folder" in one_error_line(capsys, "generate")
    if os.geteuid() == 0:
        return  # root writes into read-only folders
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([*args, "--out", str(locked / "grid.png")]) == 2
        err = one_error_line(capsys, "generate")
        assert f"cannot write in {locked}" in err and "writable folder" in err
    finally:
        locked.chmod(0o700)


def test_generate_control_type_must_be_the_one_the_run_was_trained_with(segmentation_run, tmp_path, capsys):
    target = target_png(tmp_path)
    args = ["generate", "--adapter", str(segmentation_run), *PROMPT, "--num-images", "1", "--control", str(target)]
    assert main([*args, "--control-type", "canny", "--out", str(tmp_path / "a.png")]) == 2
    err = one_error_line(capsys, "generate")
    assert "trained on segmentation control maps; pass --control-type segmentation" in err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a-control.png").exists()
    assert main([*args, "--control-type", "segmentation", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b-control.png").is_file()


def wide_grey_versions(tmp_path):
    """An 8-bit greyscale PNG spanning 0..255 and the same picture as 16-bit (full and 12-bit range), I and F."""
    from PIL import Image

    ramp = np.linspace(0, 1, SIZE)[None, :] * np.ones((SIZE, 1))
    grey = np.round(255 * np.clip(0.6 * glyphs.subject_images("K", 1, size=SIZE)[0] + 0.4 * ramp, 0, 1))
    grey[0, 0], grey[-1, -1] = 0, 255  # spans the whole 8-bit range
    v = grey.astype(np.int64)
    Image.fromarray(v.astype(np.uint8), mode="L").save(tmp_path / "8bit.png")
    wide = {"16bit.png": Image.fromarray((v * 257).astype(np.uint16)),  # mode I;16
            "12bit.png": Image.fromarray((v * 16).astype(np.uint16)),
            "int32.tiff": Image.fromarray((v * 1000 - 5).astype(np.int32)),  # mode I
            "float.tiff": Image.fromarray((v / 255.0).astype(np.float32))}  # mode F
    for name, image in wide.items():
        image.save(tmp_path / name)
    return tmp_path / "8bit.png", [tmp_path / name for name in wide]


@pytest.mark.parametrize("control", ["canny", "segmentation"])
def test_a_16_bit_control_image_gives_the_control_map_of_its_8_bit_equivalent(tmp_path, control):
    from PIL import Image

    from peftlab.diffusion.control import make_control
    from peftlab.recipes.image.data import open_image

    eight, wide = wide_grey_versions(tmp_path)
    expected = np.asarray(make_control(open_image(eight, "--control"), control))
    assert 0 < expected.mean() < 255
    for path in wide:
        with Image.open(path) as image:
            assert image.mode in ("I;16", "I", "F"), image.mode
            np.testing.assert_array_equal(np.asarray(make_control(image, control)), expected, err_msg=path.name)
        np.testing.assert_array_equal(np.asarray(open_image(path, "--control")), np.asarray(open_image(eight, "x")),
                                      err_msg=path.name)


def test_images_over_the_decompression_bomb_limit_are_one_line_errors(segmentation_run, tiny_sd_dir, tmp_path,  # noqa: F811
                                                                     monkeypatch, capsys):
    from PIL import Image

    target = target_png(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 16×16 image (256 pixels) is over 2 × 100
    assert main(["generate", "--adapter", str(segmentation_run), *PROMPT, "--num-images", "1", "--control",
                 str(target), "--out", str(tmp_path / "g.png")]) == 2
    err = one_error_line(capsys, "generate")
    assert f"--control: {target} is too large to open safely: Image size (256 pixels) exceeds limit of 200 pixels" \
        in err and "downscale" in err
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "g-0.png").exists()
    instances = tmp_path / "instances"
    instances.mkdir()
    target.rename(instances / "big.png")
    out = tmp_path / "out"
    assert main(["train", "--task", "subject-driven", "--model", str(tiny_sd_dir), "--instance-data", str(instances),
                 "--num-class-images", "2", "--max-steps", "1", "--output-dir", str(out)]) == 2
    assert "big.png is too large to open safely" in one_error_line(capsys, "train") and not out.exists()


# -- 18: eval of an image run ---------------------------------------------------------------------------------------
def test_eval_summary_of_an_image_run_counts_its_generated_images_not_none():
    from peftlab.recipes import summary_line

    control = {"task": "controllable", "split": "test", "metric": "edge_f1", "data": "digits", "num_examples": 6,
               "num_eval_images": 2, "test": {"edge_f1": 0.25}}
    assert summary_line(control, "runs/c") == "test edge_f1 of runs/c on digits: 0.2500 (2 generated images)"
    subject = {"task": "subject-driven", "split": "test", "metric": "subject_similarity", "data": "glyph:K",
               "test": {"subject_similarity": 0.5}}  # written before the count was recorded
    assert summary_line(subject, "runs/s") == "test subject_similarity of runs/s on glyph:K: 0.5000"
    text = {"task": "classification", "split": "test", "metric": "accuracy", "data": "d.csv", "num_examples": 100,
            "test": {"accuracy": 0.75}}
    assert summary_line(text, "runs/t").endswith(": 0.7500 (100 examples)")


# -- 8 and 15: eval of a data file ------------------------------------------------------------------------------------
def write_named_csv(path, rows: int, seed: int, names=("negative", "positive")):
    """The keyword task of conftest with the labels written as ``names`` (0 → names[0], 1 → names[1])."""
    from conftest import write_keyword_csv

    write_keyword_csv(path, rows, seed=seed)
    lines = path.read_text().splitlines()
    body = [line.rsplit(",", 1) for line in lines[1:]]
    path.write_text("\n".join([lines[0], *(f"{text},{names[int(label)]}" for text, label in body)]) + "\n")
    return path


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    """A classification run (LoRA, 2 steps) trained on the labels negative / positive."""
    from conftest import save_tiny_classifier

    root = tmp_path_factory.mktemp("named")
    save_tiny_classifier(root / "model")
    out = root / "run"
    assert main(["train", "--model", str(root / "model"), "--data", str(write_named_csv(root / "train.csv", 60, 0)),
                 "--method", "lora", "--max-steps", "2", "--batch-size", "16", "--no-initial-eval",
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "run_config.json").read_text())["labels"] == ["negative", "positive"]
    return out


def eval_json(run, tmp_path, capsys, *args) -> tuple[int, dict, str]:
    out = tmp_path / "eval.json"
    out.unlink(missing_ok=True)
    code = main(["eval", "--adapter", str(run), *args, "--output", str(out)])
    captured = capsys.readouterr()
    return code, json.loads(out.read_text()) if code == 0 else {}, captured.out + captured.err


def test_eval_of_a_data_file_scores_the_whole_file(named_run, tmp_path, capsys):
    data = write_named_csv(tmp_path / "hundred.csv", 100, seed=3)
    code, metrics, printed = eval_json(named_run, tmp_path, capsys, "--data", str(data))
    assert code == 0 and metrics["num_examples"] == 100 and metrics["split"] == "all"
    assert f"on all of {data}" in printed and "(100 examples)" in printed
    code, metrics, printed = eval_json(named_run, tmp_path, capsys, "--data", str(data), "--split", "test")
    assert code == 0 and metrics["num_examples"] == 10 and "(10 examples)" in printed  # a split when asked for
    code, metrics, _ = eval_json(named_run, tmp_path, capsys)  # the run's own data: its test split
    assert code == 0 and metrics["split"] == "test"
    assert metrics["num_examples"] == json.loads((named_run / "metrics.json").read_text())["num_test"]


def test_integer_labels_index_the_named_labels_of_the_model(named_run, tmp_path, capsys):
    named = write_named_csv(tmp_path / "named.csv", 50, seed=4)
    ints = write_named_csv(tmp_path / "ints.csv", 50, seed=4, names=("0", "1"))
    code, by_name, _ = eval_json(named_run, tmp_path, capsys, "--data", str(named))
    assert code == 0
    code, by_index, _ = eval_json(named_run, tmp_path, capsys, "--data", str(ints))
    assert code == 0 and by_index["num_examples"] == by_name["num_examples"] == 50
    assert by_index["all"] == by_name["all"]
    swapped = write_named_csv(tmp_path / "swapped.csv", 50, seed=4, names=("1", "0"))  # 1 = positive: all wrong
    code, flipped, _ = eval_json(named_run, tmp_path, capsys, "--data", str(swapped))
    assert code == 0 and flipped["all"]["accuracy"] == pytest.approx(1 - by_name["all"]["accuracy"])
    wide = write_named_csv(tmp_path / "wide.csv", 50, seed=4, names=("0", "2"))
    code, _, printed = eval_json(named_run, tmp_path, capsys, "--data", str(wide))
    assert code == 2 and "integer label(s) ['2'] out of range" in printed
    assert "labels ['negative', 'positive'] (0 = 'negative'), so they must be 0..1" in printed
    other = write_named_csv(tmp_path / "other.csv", 50, seed=4, names=("bad", "good"))
    code, _, printed = eval_json(named_run, tmp_path, capsys, "--data", str(other))
    assert code == 2 and "['bad', 'good'] are not labels the model was trained on" in printed
    assert "or their indices 0..1" in printed
