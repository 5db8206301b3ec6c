"""``--control-encoder controlnet``: the controllable recipe with a diffusers ControlNet (a trainable copy of the UNet's
encoder whose zero-initialised outputs feed every skip connection and the mid block) instead of the small hint
encoder on ``conv_in``. On a tiny random Stable Diffusion pipeline (16×16 images, 8×8 latents): it starts exactly at
the base, it trains, it saves / loads / resumes / merges, and ``peftlab generate --control`` uses it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from conftest import FAST_IMAGE_ARGS, crash_at_checkpoint

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab.cli import main
from peftlab.data import glyphs
from peftlab.diffusion.conditioning import new_controlnet
from peftlab.diffusion.control import control_tensor
from peftlab.diffusion.pipeline import load_pipeline_adapters, save_pipeline_adapters, with_control_encoder
from peftlab.recipes.image import training as image_training
from peftlab.recipes.options import RunOptions

SIZE = 16
FAST = FAST_IMAGE_ARGS


@pytest.fixture(scope="module")
def loaded(tiny_sd_dir):
    return image_training.load_base(RunOptions(task="controllable", model=str(tiny_sd_dir), data="unused").resolved())


@pytest.fixture
def pipe(loaded):
    """A ControlNet pipeline around a fresh copy of the base, with LoRA adapters on its UNet (as the recipe builds
    it: the ControlNet copied from the base UNet before the adapters go on)."""
    base = copy.deepcopy(loaded)
    control_pipe = with_control_encoder(base, new_controlnet(base))
    opts = RunOptions(task="controllable", model="unused", data="unused", method="lora", r=2, output_dir="unused",
                      control_encoder="controlnet").resolved()
    image_training.add_adapters(control_pipe, opts, False, ["a photo of sks dog"])
    return control_pipe


def fixed_batch(pipe, seed: int = 0) -> image_training.Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    ids = image_training.token_ids(pipe, ["a photo of sks dog", "a photo of a dog"])
    batch = image_training.Batch(image_training.latents_of(pipe, images), ids, torch.tensor([0.5, 0.5]),
                                 (images[:, :1].repeat(1, 3, 1, 1) > 0).float())
    return image_training.draw_noise(batch, pipe.scheduler.config.num_train_timesteps, g)


def predictions(pipe, batch: image_training.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's output with the ControlNet's residuals of the batch's controls, the UNet's output alone)."""
    scheduler = image_training.noise_scheduler(pipe)
    noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    with torch.no_grad():
        states = pipe.text_encoder(batch.ids).last_hidden_state
        controlled = image_training.unet_prediction(pipe, noisy, batch.timesteps, states, batch.control)
        alone = pipe.unet(noisy, batch.timesteps, encoder_hidden_states=states).sample
    return controlled, alone


def test_controlnet_starts_exactly_at_the_base_and_trains(pipe):
    batch = fixed_batch(pipe)
    controlled, alone = predictions(pipe, batch)
    # every output of the ControlNet passes a zero 1×1 convolution: the residuals are exact zeros, and x + 0 == x
    torch.testing.assert_close(controlled, alone, rtol=0, atol=0)
    controlnet = pipe.controlnet
    assert controlnet.controlnet_cond_embedding.conv_out.weight.abs().max() == 0
    loss = image_training.denoising_loss(pipe, image_training.noise_scheduler(pipe), batch)
    loss.backward()
    grads = {n: p.grad for n, p in controlnet.named_parameters()}
    # at the start only the zero convolutions get a gradient (the rest sits behind them), as in ControlNet's paper
    assert all(grads[f"controlnet_down_blocks.{i}.weight"].abs().max() > 0 for i in range(len(
        controlnet.controlnet_down_blocks)))
    assert grads["controlnet_mid_block.weight"].abs().max() > 0
    controlnet.zero_grad()
    modules = [pipe.peftlab_adapters["unet"].base_model, controlnet]
    opts = RunOptions(task="controllable", model="unused", data="unused", method="lora", lr=1e-2, max_steps=3,
                      warmup=0, output_dir="unused", control_encoder="controlnet").resolved()
    start = {n: p.detach().clone() for n, p in controlnet.named_parameters()}
    image_training.fit(pipe, modules, lambda: batch, opts, progress=False)
    moved = {n for n, p in controlnet.named_parameters() if not torch.equal(p, start[n])}
    assert "controlnet_cond_embedding.conv_in.weight" in moved  # once the zero convolutions moved, the copy trains
    assert any(n.startswith("down_blocks.") for n in moved)
    controlled, alone = predictions(pipe, batch)
    assert (controlled - alone).abs().max() > 1e-5  # the control now changes the prediction


def test_saved_controlnet_loads_back_and_generate_uses_it(pipe, tmp_path):
    from PIL import Image

    batch = fixed_batch(pipe)
    with torch.no_grad():  # moved off the start, so that the control matters
        for p in pipe.controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    run = save_pipeline_adapters(pipe, tmp_path / "run")
    assert json.loads((run / "pipeline.json").read_text())["control"] == "controlnet"
    assert sorted(p.name for p in (run / "controlnet").iterdir()) == ["config.json",
                                                                      "diffusion_pytorch_model.safetensors"]
    assert not [p for p in run.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]  # safetensors only
    loaded = load_pipeline_adapters(run)
    assert type(loaded).__name__ == "StableDiffusionControlNetPipeline"
    want = pipe.controlnet.state_dict()
    got = loaded.controlnet.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for a, b in zip(predictions(loaded, batch), predictions(pipe, batch), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same weights, the same arithmetic

    def png(name: str, letter: str):
        path = tmp_path / f"{name}.png"
        Image.fromarray((glyphs.subject_images(letter, 1, size=SIZE)[0] > 0.4).astype(np.uint8) * 255).save(path)
        return path

    def generated(control, name: str, adapter=run) -> list[np.ndarray]:
        out = tmp_path / f"{name}.png"
        assert main(["generate", "--adapter", str(adapter), "--prompt", "a photo of sks dog", "--num-images", "2",
                     "--steps", "2", "--guidance-scale", "2", "--seed", "0", "--control", str(control), "--out",
                     str(out)]) == 0
        return [np.asarray(Image.open(tmp_path / f"{name}-{i}.png"), dtype=np.int16) for i in range(2)]

    edges_k, edges_w = png("k", "K"), png("w", "W")
    image = control_tensor([Image.open(edges_k).convert("RGB")], None)
    with torch.inference_mode():
        expected = pipe("a photo of sks dog", image=image, num_images_per_prompt=2, num_inference_steps=2,
                        guidance_scale=2.0, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0),
                        output_type="pil").images
    with_k = generated(edges_k, "gen-k")
    for got_image, want_image in zip(with_k, expected, strict=True):
        assert np.abs(got_image - np.asarray(want_image, dtype=np.int16)).max() <= 1
    with_w = generated(edges_w, "gen-w")  # another control image gives other images: the ControlNet is used
    assert any(np.abs(a - b).max() > 2 for a, b in zip(with_k, with_w, strict=True))
    # merged into a plain diffusers ControlNet pipeline folder: the same images
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    for got_image, want_image in zip(generated(edges_k, "merged-k", tmp_path / "merged"), with_k, strict=True):
        assert np.abs(got_image - want_image).max() <= 1


def write_digits(folder, count: int = 4) -> None:
    folder.mkdir()
    for i, image in enumerate(glyphs.to_pil(glyphs.digit_images(SIZE).images[:count])):
        image.save(folder / f"d{i}.png")


def test_cli_controlnet_run_resumes_where_an_uninterrupted_run_ends(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    write_digits(tmp_path / "digits")

    def args(out):
        return ["train", "--task", "controllable", "--model", str(tiny_sd_dir), "--data", str(tmp_path / "digits"),
                "--control", "canny", "--control-encoder", "controlnet", "--method", "hra", "--max-steps", "2",
                "--eval-steps", "1", "--output-dir", str(out), *FAST]

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(args(straight)) == 0
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["control_encoder"] == "controlnet" and "edge_f1" in metrics["before"]
    assert metrics["trainable_params"] > metrics["condition_encoder_params"] > 0
    assert json.loads((straight / "pipeline.json").read_text())["control"] == "controlnet"
    crash_at_checkpoint(monkeypatch, lambda: main(args(crashed)), step=1)
    capsys.readouterr()
    assert main([*args(crashed), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    for name in (f"checkpoint-2/{image_training.CHECKPOINT_WEIGHTS}", "controlnet/diffusion_pytorch_model.safetensors"):
        want, got = (load_file(run / name) for run in (straight, crashed))
        assert set(want) == set(got) and want
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert json.loads((crashed / "metrics.json").read_text())["test"] == metrics["test"]
