"""The image recipes (``--task subject-driven`` / ``controllable``) on a tiny random Stable Diffusion pipeline saved
with ``save_pretrained`` (16×16 images, 8×8 latents): what trains, that training lowers the loss, the class-image
cache, the run folder (reload, generate with --control, merge) and one-line errors that leave no run folder.
The embedded ``tiny-digits`` model is never pretrained here."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from conftest import FAST_IMAGE_ARGS, crash_at_checkpoint

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import stats
from peftlab.cli import main
from peftlab.data import glyphs
from peftlab.diffusion.conditioning import attach_condition_encoder, controlled, new_condition_encoder
from peftlab.diffusion.control import control_tensor
from peftlab.diffusion.pipeline import load_pipeline_adapters, merge_pipeline, save_pipeline_adapters
from peftlab.errors import RecipeError
from peftlab.recipes.image import data as image_data
from peftlab.recipes.image import training as image_training
from peftlab.recipes.options import RunOptions
from peftlab.recipes.test_items import read_items

SIZE = 16
METHODS = ("hra", "lora", "hydralora", "mtlora")
FAST = FAST_IMAGE_ARGS


@pytest.fixture(scope="module")
def loaded(tiny_sd_dir):
    return image_training.load_base(RunOptions(task="subject-driven", model=str(tiny_sd_dir)).resolved())


@pytest.fixture
def pipe(loaded):
    return copy.deepcopy(loaded)


@pytest.fixture(autouse=True)
def class_cache(tmp_path, monkeypatch):
    """Class images go to a fresh folder per test (the glyph classifier stays in the user's cache)."""
    monkeypatch.setattr(image_data, "class_cache_root", lambda: tmp_path / "class-images")
    return tmp_path / "class-images"


def options(tiny_sd_dir, task: str, method: str = "hra", **changes) -> RunOptions:
    values = {"task": task, "model": str(tiny_sd_dir), "method": method, "r": 2, "batch_size": 2, "warmup": 0,
              "max_steps": 1, "output_dir": "unused", **changes}
    return RunOptions(**values).resolved()


def fixed_batch(pipe, control: bool, seed: int = 0) -> image_training.Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    ids = image_training.token_ids(pipe, ["a photo of sks dog", "a photo of a dog"])
    batch = image_training.Batch(image_training.latents_of(pipe, images), ids, torch.tensor([0.5, 0.5]),
                                 (images[:, :1].repeat(1, 3, 1, 1) > 0).float() if control else None)
    return image_training.draw_noise(batch, pipe.scheduler.config.num_train_timesteps, g)


def setup(pipe, opts: RunOptions, control: bool, text_encoder: bool = False):
    """The trainable modules of a recipe (adapters on the UNet [+ text encoder], the condition encoder) and its hook."""
    models = image_training.add_adapters(pipe, opts, text_encoder, ["a photo of sks dog"])
    modules = [m.base_model for m in models.values()]
    hook = None
    if control:
        encoder = new_condition_encoder(pipe)
        hook = attach_condition_encoder(pipe, encoder)
        modules.append(encoder)
    return modules, hook


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", ["subject-driven", "controllable"])
def test_one_step_changes_only_adapters_and_encoder(pipe, tiny_sd_dir, task, method):
    control = task == "controllable"
    opts = options(tiny_sd_dir, task, method, lr=1e-2)
    frozen = {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder", "vae")
              for k, v in pipe.components[name].state_dict().items()}
    modules, hook = setup(pipe, opts, control, text_encoder=not control)
    trained = {n: p.detach().clone() for i, m in enumerate(modules) for n, p in
               ((f"{i}.{n}", p) for n, p in m.named_parameters()) if p.requires_grad}
    batch = fixed_batch(pipe, control)
    result = image_training.fit(pipe, modules, lambda: batch, opts, hook=hook, progress=False)
    assert np.isfinite(result["final_loss"]) and result["global_step"] == 1
    after = {f"{i}.{n}": p for i, m in enumerate(modules) for n, p in m.named_parameters() if p.requires_grad}
    changed = {n for n in trained if not torch.equal(trained[n], after[n])}
    assert changed, "one step changed no trainable parameter"
    assert all(".adapters." in n or n.startswith(f"{len(modules) - 1}.") and control for n in changed), changed
    if control:  # the zero convolution of the encoder moved off zero
        assert any(n.endswith("zero_conv.weight") for n in changed)
    else:  # the text encoder's adapters trained too
        assert any(n.startswith("1.") for n in changed)
    state = {f"{name}.{k}": v for name in ("unet", "text_encoder", "vae")
             for k, v in pipe.components[name].state_dict().items() if ".adapters." not in k}
    base_keys = {k.replace(".base_layer", "") for k in state}
    assert set(frozen) <= base_keys | set(state)
    for key, value in state.items():  # every frozen weight is bit-identical
        assert torch.equal(frozen[key.replace(".base_layer", "")], value), key
    assert result["trainable_params"] == sum(p.numel() for p in after.values())


@pytest.mark.parametrize("task", ["subject-driven", "controllable"])
def test_twenty_steps_on_one_batch_lower_the_loss(pipe, tiny_sd_dir, task):
    control = task == "controllable"
    opts = options(tiny_sd_dir, task, "lora", lr=1e-2, max_steps=20)
    modules, hook = setup(pipe, opts, control)
    batch = fixed_batch(pipe, control)
    losses = image_training.fit(pipe, modules, lambda: batch, opts, hook=hook, progress=False)["losses"]
    assert len(losses) == 20 and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_loss_regresses_what_the_scheduler_predicts(pipe, prediction_type):
    """ε, v = √ᾱ_t·ε − √(1−ᾱ_t)·z₀ or z₀, as the pipeline's scheduler says (Stable Diffusion 2.x is v_prediction),
    each written out here from the scheduler's ᾱ_t."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    scheduler = image_training.noise_scheduler(pipe)
    assert scheduler.config.prediction_type == prediction_type
    batch = fixed_batch(pipe, control=False)
    with torch.no_grad():
        loss = image_training.denoising_loss(pipe, scheduler, batch)
        a = scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
        z0, noise = batch.latents, batch.noise
        noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
        states = pipe.text_encoder(batch.ids).last_hidden_state
        prediction = pipe.unet(noisy, batch.timesteps, encoder_hidden_states=states).sample
        target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z0, "sample": z0}
        per_example = {k: (prediction - y).pow(2).mean(dim=(1, 2, 3)) for k, y in target.items()}
    expected = {k: (batch.weights * v).sum() for k, v in per_example.items()}
    torch.testing.assert_close(loss, expected[prediction_type], rtol=1e-5, atol=1e-6)
    assert all(abs(expected[prediction_type] - v) > 1e-3 for k, v in expected.items() if k != prediction_type)


def test_an_unknown_prediction_type_is_refused(pipe):
    scheduler = image_training.noise_scheduler(pipe)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(RecipeError, match="prediction_type='flow'"):
        image_training.denoising_loss(pipe, scheduler, fixed_batch(pipe, control=False))


def test_condition_encoder_starts_as_the_base_and_tiles_over_the_batch(pipe):
    sample, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 10, 500, 500])
    states = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(sample, t, encoder_hidden_states=states).sample
        encoder = new_condition_encoder(pipe)
        attach_condition_encoder(pipe, encoder)
        control = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
        with controlled(pipe, control):
            torch.testing.assert_close(pipe.unet(sample, t, encoder_hidden_states=states).sample, base, rtol=0, atol=0)
            torch.nn.init.normal_(encoder.zero_conv.weight, std=0.1)
            out = pipe.unet(sample, t, encoder_hidden_states=states).sample
            with controlled(pipe, control.repeat(2, 1, 1, 1)):  # tiled = the same control given per example
                torch.testing.assert_close(pipe.unet(sample, t, encoder_hidden_states=states).sample, out)
        assert (out - base).abs().max() > 1e-4


def test_class_images_are_generated_once_and_reused(pipe, class_cache, monkeypatch):
    args = ("model-a", "a photo of a dog", 3, 0, SIZE, 2, 3.0)
    first, reused = image_data.class_images(pipe, *args)
    assert not reused and len(first) == 3 and len(list(class_cache.iterdir())) == 1
    def fail(*args, **kwargs):
        raise RuntimeError("generated again")

    monkeypatch.setattr(image_data, "generate_images", fail)
    second, reused = image_data.class_images(pipe, *args)
    assert reused and [np.asarray(a).tolist() for a in first] == [np.asarray(b).tolist() for b in second]
    with pytest.raises(RuntimeError, match="generated again"):  # another count is another set
        image_data.class_images(pipe, "model-a", "a photo of a dog", 4, 0, SIZE, 2, 3.0)
    assert not [p for p in class_cache.iterdir() if p.name.startswith(".")]  # no temporary folder left


def control_run(pipe, tiny_sd_dir, tmp_path):
    """An in-memory control pipeline moved off its start (HRA adapters + encoder), and its saved run folder."""
    opts = options(tiny_sd_dir, "controllable", "hra", lr=3e-2, max_steps=3)
    modules, hook = setup(pipe, opts, control=True)
    batch = fixed_batch(pipe, control=True)
    image_training.fit(pipe, modules, lambda: batch, opts, hook=hook, progress=False)
    torch.nn.init.normal_(modules[-1].zero_conv.weight, std=0.2)
    hook.control = None
    return save_pipeline_adapters(pipe, tmp_path / "run")


def in_memory_images(pipe, edges_png, seed: int = 0, num: int = 2) -> list[np.ndarray]:
    from PIL import Image

    control = control_tensor([Image.open(edges_png).convert("RGB")], None)
    with torch.inference_mode(), controlled(pipe, control):
        images = pipe("a photo of sks dog", num_images_per_prompt=num, num_inference_steps=2, guidance_scale=2.0,
                      height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed), output_type="pil").images
    return [np.asarray(im, dtype=np.int16) for im in images]


def generated(run, tmp_path, edges_png, name: str) -> list[np.ndarray]:
    from PIL import Image

    out = tmp_path / f"{name}.png"
    assert main(["generate", "--adapter", str(run), "--prompt", "a photo of sks dog", "--num-images", "2", "--steps",
                 "2", "--guidance-scale", "2", "--seed", "0", "--control", str(edges_png), "--out", str(out)]) == 0
    return [np.asarray(Image.open(tmp_path / f"{name}-{i}.png"), dtype=np.int16) for i in range(2)]


def test_control_run_reloads_generates_and_merges_like_the_in_memory_model(pipe, tiny_sd_dir, tmp_path):
    from PIL import Image

    run = control_run(pipe, tiny_sd_dir, tmp_path)
    assert json.loads((run / "pipeline.json").read_text())["control"] == "condition_encoder"
    assert (run / "condition_encoder" / "model.safetensors").is_file()
    edges = tmp_path / "edges.png"
    Image.fromarray((glyphs.subject_images("K", 1, size=SIZE)[0] > 0.4).astype(np.uint8) * 255).save(edges)
    expected = in_memory_images(pipe, edges)
    for got, want in zip(generated(run, tmp_path, edges, "loaded"), expected, strict=True):
        assert np.abs(got - want).max() <= 1
    without = in_memory_images(load_pipeline_adapters(run.parent / "run"), edges, seed=1)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(without, expected, strict=True))  # the seed matters
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    control = control_tensor([Image.open(edges).convert("RGB")], None)

    def latents(p):
        with torch.no_grad(), controlled(p, control):
            return p("a photo of sks dog", num_inference_steps=2, latents=start.clone(), output_type="latent",
                     height=SIZE, width=SIZE, guidance_scale=2.0).images

    unmerged = latents(pipe)
    torch.testing.assert_close(latents(merge_pipeline(pipe)), unmerged, rtol=1e-4, atol=1e-4)
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "condition_encoder" / "config.json").is_file()
    for got, want in zip(generated(tmp_path / "merged", tmp_path, edges, "merged"), expected, strict=True):
        assert np.abs(got - want).max() <= 1


def test_generate_computes_the_control_map_of_a_target_image(pipe, tiny_sd_dir, tmp_path, capsys):
    from PIL import Image

    from peftlab.diffusion.control import canny

    run = control_run(pipe, tiny_sd_dir, tmp_path)
    target = tmp_path / "target.png"
    glyphs.to_pil(glyphs.subject_images("K", 1, size=2 * SIZE))[0].save(target)  # not the output size
    args = ["generate", "--adapter", str(run), "--prompt", "a photo of sks dog", "--num-images", "2", "--steps", "2",
            "--seed", "0"]
    assert main([*args, "--control", str(target), "--control-type", "canny", "--out", str(tmp_path / "a.png")]) == 0
    assert "the canny control map" in capsys.readouterr().out
    expected = canny(Image.open(target).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    written = np.asarray(Image.open(tmp_path / "a-control.png").convert("RGB"))
    np.testing.assert_array_equal(written, np.asarray(expected))
    assert 0 < written.mean() < 255  # some edges, not all
    # the same images as passing that map itself
    assert main([*args, "--control", str(tmp_path / "a-control.png"), "--out", str(tmp_path / "b.png")]) == 0
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"a-{i}.png")),
                                      np.asarray(Image.open(tmp_path / f"b-{i}.png")))


def write_digits(folder, count: int = 6, size: int = SIZE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = glyphs.digit_images(size)
    rows = []
    for i, image in enumerate(glyphs.to_pil(data.images[:count])):
        image.save(folder / f"d{i}.png")
        rows.append(json.dumps({"file_name": f"d{i}.png", "text": glyphs.caption(int(data.labels[i]))}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def test_cli_subject_driven_end_to_end(tiny_sd_dir, tmp_path, capsys, class_cache):
    out = tmp_path / "run"
    glyphs.write_subject_folder("Q", tmp_path / "subject", count=3)
    args = ["train", "--task", "subject-driven", "--model", str(tiny_sd_dir),
            "--instance-data", str(tmp_path / "subject"), "--instance-prompt", "a photo of sks glyph",
            "--class-prompt", "a photo of a glyph", "--method", "lora",
            "--num-class-images", "2", "--max-steps", "2", "--train-text-encoder", "--output-dir", str(out), *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "generated by the base model and cached" in printed and "subject_similarity" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["num_class_images"] == 2 and not metrics["class_images_reused"]
    assert {"subject_similarity", "prior_class_accuracy"} <= set(metrics["test"]) <= set(metrics["before"]) | {"x"}
    assert set(metrics["skipped"]) == {"clip_i", "clip_t", "dino"} and "--eval-encoder" in metrics["skipped"]["dino"]
    items = read_items(out)  # one row per scored sample; their mean is the subject similarity
    assert items.aggregate == "mean" and len(items.rows) == metrics["num_eval_images"]
    assert np.mean([r["value"] for r in items.rows]) == pytest.approx(metrics["test"]["subject_similarity"], abs=1e-12)
    info = json.loads((out / "pipeline.json").read_text())
    assert info["components"] == ["text_encoder", "unet"] and info["base_model"] == str(tiny_sd_dir)
    assert json.loads((out / "run_config.json").read_text())["options"]["task"] == "subject-driven"
    assert (out / "samples.png").is_file()
    assert main([*args, "--overwrite"]) == 0  # the same class images, from the cache
    assert "reused from the cache" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0 and "lora_A" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(out), "--prompt", "a photo of sks glyph", "--num-images", "1",
                 "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0


def test_cli_controllable_end_to_end(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "run"
    write_digits(tmp_path / "digits")
    assert main(["train", "--task", "controllable", "--model", str(tiny_sd_dir), "--data", str(tmp_path / "digits"),
                 "--control", "canny", "--method", "hydralora", "--max-steps", "2", "--output-dir", str(out),
                 *FAST]) == 0
    assert "edge_f1" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 6 and 0 <= metrics["test"]["edge_f1"] <= 1 and "edge_ssim" in metrics["before"]
    assert "class_accuracy" in metrics["skipped"]  # a folder of images has no glyph labels
    assert metrics["trainable_params"] > metrics["condition_encoder_params"] > 0
    items = read_items(out)  # one row per held-out control; their mean is the edge F1
    assert len(items.rows) == metrics["num_eval_images"] and len(set(items.keys)) == len(items.rows)
    assert np.mean([r["value"] for r in items.rows]) == pytest.approx(metrics["test"]["edge_f1"], abs=1e-12)
    assert main(["eval", "--adapter", str(out), "--items", str(tmp_path / "items.jsonl")]) == 0
    assert "test edge_f1" in capsys.readouterr().out
    assert [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()] == items.rows


def test_compare_runs_an_image_task(tiny_sd_dir, tmp_path, capsys):
    write_digits(tmp_path / "digits")
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "controllable", "--model", str(tiny_sd_dir), "--data", str(tmp_path / "digits"),
                 "--control", "canny", "--methods", "hra,lora", "--seeds", "1", "--max-steps", "2", "--output-dir",
                 str(out), *FAST]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["metric"] == "edge_f1" and result["budget"]["control"] == "canny"
    assert [row["method"] for row in result["rows"]] == ["hra", "lora"]
    run = result["runs"][0]
    pipe = load_pipeline_adapters(out / "hra" / "seed-0")
    models = [pipe.unet, pipe.vae, pipe.text_encoder]
    encoder = json.loads((out / "hra" / "seed-0" / "metrics.json").read_text())["condition_encoder_params"]
    assert run["total_params"] == sum(p.numel() for m in models for p in m.parameters()) + encoder
    assert 0 < run["trainable_params"] < run["total_params"]
    assert "| hra |" in (out / "compare.md").read_text()
    items = [read_items(out / m / "seed-0") for m in ("hra", "lora")]
    assert items[0].keys == items[1].keys  # the same held-out controls: paired item by item
    for row, found in zip(result["rows"], items, strict=True):
        interval = stats.bootstrap("mean", stats.statistics("mean", [found.rows]))
        assert row["ci95"] == pytest.approx([interval.low, interval.high], abs=1e-12)
    assert [r["method"] for r in result["paired"]["rows"]] == ["hra"] and result["paired"]["baseline"] == "lora"


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from peftlab.recipes.rundir import checkpoint_folders

    write_digits(tmp_path / "digits")

    def args(out):
        return ["train", "--task", "controllable", "--model", str(tiny_sd_dir), "--data", str(tmp_path / "digits"),
                "--control", "canny", "--method", "lora", "--max-steps", "4", "--eval-steps", "2", "--output-dir",
                str(out), *FAST]

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(args(straight)) == 0
    assert [p.name for p in checkpoint_folders(straight)] == ["checkpoint-4"]  # only the newest is kept
    crash_at_checkpoint(monkeypatch, lambda: main(args(crashed)), step=2)
    assert [p.name for p in checkpoint_folders(crashed)] == ["checkpoint-2"] and not (crashed / "metrics.json").exists()
    capsys.readouterr()
    assert main([*args(crashed), "--resume"]) == 0
    assert f"resuming from {crashed / 'checkpoint-2'} (step 2 of 4)" in capsys.readouterr().out
    want, got = (load_file(run / "checkpoint-4" / image_training.CHECKPOINT_WEIGHTS) for run in (straight, crashed))
    assert set(want) == set(got) and any(k.startswith("1.") for k in want)  # adapters and the condition encoder
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    first, second = (json.loads((run / "metrics.json").read_text()) for run in (straight, crashed))
    assert second["final_loss"] == first["final_loss"] and second["test"] == first["test"]
    assert second["global_step"] == 4
    # a checkpoint is a pipeline adapter folder: generate samples from it
    assert main(["generate", "--adapter", str(crashed / "checkpoint-4"), "--prompt", "a handwritten digit 3",
                 "--control", str(tmp_path / "digits" / "d0.png"), "--control-type", "canny", "--num-images", "1",
                 "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert main([*args(crashed), "--resume"]) == 0  # finished: nothing to do
    assert "already finished" in capsys.readouterr().out
    # killed while writing checkpoint-4 (before its trainer_state.json): resumed from checkpoint-2, same end
    killed = tmp_path / "killed"
    steps = iter(range(1, 100))
    write_json = image_training.files.atomic_write_json

    def dies_before_the_second_trainer_state(path, data):  # as a crash would: checkpoint-4 lacks only that file
        if Path(path).name == image_training.TRAINER_STATE and next(steps) == 2:
            raise ZeroDivisionError("killed")
        return write_json(path, data)

    monkeypatch.setattr(image_training.files, "atomic_write_json", dies_before_the_second_trainer_state)
    with pytest.raises(ZeroDivisionError):
        main(args(killed))
    monkeypatch.undo()
    assert [p.name for p in checkpoint_folders(killed)] == ["checkpoint-2", "checkpoint-4"]
    capsys.readouterr()
    assert main([*args(killed), "--resume"]) == 0
    assert f"resuming from {killed / 'checkpoint-2'} (step 2 of 4)" in capsys.readouterr().out
    assert [p.name for p in checkpoint_folders(killed)] == ["checkpoint-4"]
    got = load_file(killed / "checkpoint-4" / image_training.CHECKPOINT_WEIGHTS)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def crashed_after_the_first_checkpoint(tiny_sd_dir, tmp_path, monkeypatch, method: str) -> tuple[Path, list[str]]:
    """A 2-step controllable run that crashed right after writing checkpoint-1: (its folder, its arguments)."""
    write_digits(tmp_path / "digits")
    out = tmp_path / "run"
    args = ["train", "--task", "controllable", "--model", str(tiny_sd_dir), "--data", str(tmp_path / "digits"),
            "--control", "canny", "--method", method, "--max-steps", "2", "--eval-steps", "1", "--output-dir",
            str(out), *FAST]
    crash_at_checkpoint(monkeypatch, lambda: main(args), step=1)
    return out, args


def test_resume_from_a_corrupt_checkpoint_is_a_one_line_error(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    out, args = crashed_after_the_first_checkpoint(tiny_sd_dir, tmp_path, monkeypatch, "hra")
    (out / "checkpoint-1" / image_training.CHECKPOINT_WEIGHTS).write_bytes(b"not safetensors")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint-1 cannot be read" in err and "--overwrite" in err, err
    assert not (out / "metrics.json").exists()


class Planted:
    """Unpickling this creates the file ``marker``: what a planted checkpoint file could do (run any code)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_resume_never_unpickles_a_planted_checkpoint_file(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    """accelerate reads its optimiser, schedule and RNG files with weights_only=True (an RNG file it cannot read it
    would skip silently: peftlab refuses it), and peftlab registers no custom object (those accelerate unpickles
    fully): a checkpoint file holding Python objects is a one-line error, and its code never runs. So is one holding
    the tensors of other parameters."""
    from safetensors.torch import save_file

    out, args = crashed_after_the_first_checkpoint(tiny_sd_dir, tmp_path, monkeypatch, "lora")
    checkpoint = out / "checkpoint-1"
    marker = tmp_path / "the planted code ran"
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        file = checkpoint / name
        original = file.read_bytes() if file.exists() else None
        torch.save(Planted(marker), file)
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "checkpoint-1 cannot be read" in err, (name, err)
        assert not marker.exists(), name
        file.unlink()
        if original is not None:
            file.write_bytes(original)
    weights = checkpoint / image_training.CHECKPOINT_WEIGHTS
    original = weights.read_bytes()
    save_file({"0.other": torch.zeros(2)}, weights)  # tensors of other parameters
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint-1 holds other trainable parameters" in err, err
    weights.write_bytes(original)
    assert main([*args, "--resume"]) == 0  # the checkpoint as written resumes
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2


def bad_cases(tmp_path, tiny_sd_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png at all")
    blank = tmp_path / "blank"
    blank.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (SIZE, SIZE), "black").save(blank / f"{i}.png")
    sizes = tmp_path / "sizes"
    write_digits(sizes, count=2)
    Image.new("RGB", (SIZE, 2 * SIZE), "white").save(sizes / "c0.png")
    Image.new("RGB", (SIZE, SIZE), "white").save(sizes / "c1.png")
    rows = [json.loads(line) for line in (sizes / "metadata.jsonl").read_text().splitlines()]
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({**rows[0], "file_name": "sizes/d0.png", "control_file": "sizes/c1.png"}) + "\n"
                       + json.dumps({**rows[1], "file_name": "sizes/d1.png"}) + "\n")
    for row, control in zip(rows, ("c0.png", "c1.png"), strict=True):
        row["control_file"] = control
    (sizes / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subject = ["--task", "subject-driven", "--model", str(tiny_sd_dir), "--num-class-images", "2"]
    control = ["--task", "controllable", "--model", str(tiny_sd_dir)]
    return {
        "no images": ([*subject, "--instance-data", str(empty)], "holds no images"),
        "unreadable image": ([*subject, "--instance-data", str(broken)], "a.png is not a readable image"),
        "long prompt": ([*subject, "--instance-data", "glyph:K", "--instance-prompt", "dog " * 80],
                        "--instance-prompt is 82 tokens long .* at most 77"),
        "not a pipeline": (["--task", "subject-driven", "--model", str(empty), "--instance-data", "glyph:K"],
                           "not a diffusers pipeline folder"),
        "bad glyph": ([*subject, "--instance-data", "glyph:k"], "one upper-case letter"),
        "blank controls": ([*control, "--data", str(blank), "--control", "segmentation"],
                           "segmentation control maps of all 2 images are blank"),
        "landmarks without dlib": ([*control, "--data", str(blank), "--control", "landmarks"], "need dlib"),
        "image option on a text task": (["--task", "classification", "--control", "canny"],
                                        "--control is for --task controllable only; --task classification does not"),
        "resume without a run": ([*subject, "--instance-data", "glyph:K", "--resume"], "holds no run to resume"),
        "control size": ([*control, "--data", str(sizes), "--control", "canny"],
                         f"control c0.png is {SIZE}×{2 * SIZE} but its target d0.png is {SIZE}×{SIZE}; a control map "
                         "must have its target's size"),
        "some controls": ([*control, "--data", str(partial), "--control", "canny"],
                          "1 of 2 rows have no \"control_file\" \\(first: sizes/d1.png\\); give one for every row"),
    }


@pytest.mark.parametrize("case", ["no images", "unreadable image", "long prompt", "not a pipeline", "bad glyph",
                                  "blank controls", "landmarks without dlib", "image option on a text task",
                                  "resume without a run", "control size", "some controls"])
def test_bad_input_is_one_line_and_leaves_no_run_folder(tiny_sd_dir, tmp_path, capsys, case):
    if case == "landmarks without dlib":
        pytest.importorskip("skimage")
        try:
            import dlib  # noqa: F401

            pytest.skip("dlib is installed")
        except ImportError:
            pass
    args, message = bad_cases(tmp_path, tiny_sd_dir)[case]
    out = tmp_path / "out"
    assert main(["train", *args, "--output-dir", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_image_options_defaults():
    subject = RunOptions(task="subject-driven", method="hra").resolved()
    assert subject.lr == 3e-3 and subject.model == "tiny-digits" and subject.instance_data == "glyph:K"
    assert subject.output_dir.endswith("subject-driven-hra-glyph-K") and subject.max_steps == 300
    assert RunOptions(task="controllable", method="lora").resolved().control == "canny"
    assert RunOptions(task="classification", method="hra").resolved().lr == 1e-2  # text tasks keep theirs
    with pytest.raises(RecipeError, match="--prior-loss-weight must be a number >= 0"):
        RunOptions(task="subject-driven", prior_loss_weight=-1.0).resolved()
