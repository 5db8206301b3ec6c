"""peftlab adapters on a diffusers pipeline: every method on the UNet and the CLIP text encoder, the pipeline's
adapter folder (save / load / merge / PEFT export) and ``peftlab generate``.

One tiny random Stable Diffusion pipeline (UNet 32/64 channels, CLIP text encoder hidden 32, a small VAE, the real
CLIP tokenizer) is saved with ``save_pretrained`` and loaded through the same path as a real one.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import OTHER_MEMORY, tiny_sd_pipeline

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab.cli import main
from peftlab.diffusion.pipeline import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_pipeline_adapters,
    load_pipeline,
    load_pipeline_adapters,
    merge_pipeline,
    pipeline_adapters,
    save_pipeline_adapters,
    with_control_encoder,
)
from peftlab.diffusion.tokenizer import clip_tokenizer
from peftlab.errors import AdapterLoadError, ModelError, TargetError
from peftlab.inject import AdapterLayer
from peftlab.methods.base import ADAPTERS
from peftlab.methods.hra import HRAConfig
from peftlab.methods.hydralora import HydraLoraConfig
from peftlab.methods.lora import LoraConfig

METHOD_NAMES = sorted(ADAPTERS)
ATOL = 1e-5
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(base_dir):
    return load_pipeline(base_dir)


@pytest.fixture
def pipe(loaded):
    """A fresh copy of the loaded pipeline for each test (copying is faster than loading again)."""
    return copy.deepcopy(loaded)


def unet_inputs(seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)


def unet_out(unet, inputs) -> torch.Tensor:
    """The UNet's noise prediction, called as diffusers pipelines call it."""
    sample, t, states = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=states, return_dict=False)[0]


def text_out(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def perturb(model, seed: int = 0) -> None:
    """Move every adapter parameter away from its initial value, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model._layers():
            for p in layer.adapters.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def latents_of(pipe, seed: int = 0) -> torch.Tensor:
    """The pipeline's denoised latents for fixed starting latents (2 DDIM steps, guidance on)."""
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=2, latents=start.clone(), output_type="latent", height=32, width=32,
                    guidance_scale=3.0).images


def test_clip_tokenizer_is_openai_clip():
    tokenizer = clip_tokenizer()
    assert tokenizer(PROMPT).input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tokenizer("Hello, World!").input_ids == [49406, 3306, 267, 1002, 256, 49407]
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_on_unet_and_text_encoder(pipe, method):
    from diffusers import UNet2DConditionModel

    inputs, ids = unet_inputs(), pipe.tokenizer([PROMPT], return_tensors="pt").input_ids
    base_unet, base_text = unet_out(pipe.unet, inputs), text_out(pipe.text_encoder, ids)
    config_cls = ADAPTERS[method].config_class
    models = add_pipeline_adapters(pipe, {"unet": config_cls(r=2), "text_encoder": config_cls(r=2)})
    unet, text = models["unet"], models["text_encoder"]
    kinds = {name.rsplit(".", 1)[-1]: layer.view.kind for name, layer in unet._layers()}
    assert {"to_q", "to_k", "to_v", "0", "proj", "2"} <= set(kinds)
    conv = "conv2d" in ADAPTERS[method].supported_kinds
    assert ("proj_in" in kinds and kinds["proj_in"] == "conv2d") == conv  # SD's 1×1 Conv2d projections
    assert sum(1 for _ in text._layers()) == 2 * len(TEXT_ENCODER_TARGETS)
    assert pipe.unet is unet.base_model and isinstance(pipe.unet, UNet2DConditionModel)
    assert inspect.signature(unet.forward) == inspect.signature(pipe.unet.forward)  # what Trainer / accelerate read
    # starts as the base model, called both through the AdapterModel and through the pipeline's own unet
    torch.testing.assert_close(unet_out(unet, inputs), base_unet, rtol=0, atol=ATOL)
    torch.testing.assert_close(text_out(pipe.text_encoder, ids), base_text, rtol=0, atol=ATOL)
    perturb(unet)
    assert (unet_out(pipe.unet, inputs) - base_unet).abs().max() > 1e-3  # the pipeline's unet runs the adapter
    # one backward pass reaches only adapter parameters, through (batch, tokens, channels) and Conv2d inputs
    sample, t, states = inputs
    unet(sample, t, encoder_hidden_states=states, return_dict=False)[0].square().mean().backward()
    grads = {n for n, p in unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".adapters.default." in n for n in grads)
    assert all(p.grad is None for n, p in unet.named_parameters() if ".adapters." not in n)


def test_hydralora_routes_each_token_of_the_unet(pipe):
    """The router sees the UNet's (batch, tokens, channels) inputs: one mixture of heads per image position."""
    unet = add_pipeline_adapters(pipe, {"unet": HydraLoraConfig(r=2, num_heads=3)})["unet"]
    unet_out(pipe.unet, unet_inputs())
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    weights = layer.adapters["default"]._weights
    assert weights.shape == (2, 16 * 16, 3)  # batch 2, 16×16 latent positions, 3 heads
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 256))
    assert weights.std(dim=1).min() > 0  # the mixture changes from token to token
    assert all(v.shape == (3,) for v in unet.routing_stats().values())


def test_conv2d_targets_refused_by_methods_without_conv2d(pipe):
    with pytest.raises(TargetError, match="proj_in.*hydralora supports .*not conv2d"):
        add_pipeline_adapters(pipe, {"unet": HydraLoraConfig(r=2, target_modules=["proj_in", "to_q"])})
    assert not pipeline_adapters(pipe) and not any(isinstance(m, AdapterLayer) for m in pipe.unet.modules())


def test_failed_component_leaves_the_pipeline_unchanged(pipe):
    with pytest.raises(TargetError, match="matched nothing"):
        add_pipeline_adapters(pipe, {"unet": HRAConfig(r=2), "text_encoder": HRAConfig(r=2, target_modules=["nope"])})
    assert not pipeline_adapters(pipe) and not any(isinstance(m, AdapterLayer) for m in pipe.unet.modules())


def adapted(pipe):
    """HRA on the UNet (Conv2d projections included), LoRA on the text encoder, both moved off their init."""
    models = add_pipeline_adapters(pipe, {"unet": HRAConfig(r=2, target_modules=UNET_TARGETS),
                                          "text_encoder": LoraConfig(r=2)})
    for seed, model in enumerate(models.values()):
        perturb(model, seed)
    return pipe


def test_merged_pipeline_equals_unmerged(pipe, base_dir, tmp_path):
    from diffusers import DiffusionPipeline

    base = latents_of(pipe)
    adapted(pipe)
    expected = latents_of(pipe)
    assert (expected - base).abs().max() > 1e-3
    save_pipeline_adapters(pipe, tmp_path / "run")
    merged = merge_pipeline(pipe)
    assert not pipeline_adapters(merged) and not any(isinstance(m, AdapterLayer) for m in merged.unet.modules())
    torch.testing.assert_close(latents_of(merged), expected, rtol=1e-4, atol=1e-4)
    # peftlab merge on the folder: a plain diffusers pipeline folder, loaded by diffusers alone
    assert main(["merge", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    index = (tmp_path / "merged" / "model_index.json").read_text()
    assert "peftlab" not in index and "AdapterModel" not in index
    plain = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(latents_of(plain), expected, rtol=1e-4, atol=1e-4)


def test_save_load_exact(pipe, loaded, base_dir, tmp_path):
    adapted(pipe)
    expected = latents_of(pipe)
    folder = save_pipeline_adapters(pipe, tmp_path / "run")
    info = json.loads((folder / "pipeline.json").read_text())
    assert info["components"] == ["text_encoder", "unet"] and info["base_model"] == str(base_dir)
    assert (folder / "unet" / "adapter_model.safetensors").is_file() and (folder / "text_encoder").is_dir()
    # onto a copy of the same in-memory base (the one `pipe` was copied from): the same bits
    onto_copy = load_pipeline_adapters(folder, base=copy.deepcopy(loaded))
    torch.testing.assert_close(latents_of(onto_copy), expected, rtol=0, atol=0)
    fresh = load_pipeline_adapters(folder)  # the base named in pipeline.json, read from its files again
    for name, model in pipeline_adapters(pipe).items():
        saved, back = model.adapter_state_dict(), pipeline_adapters(fresh)[name].adapter_state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    # the same values at other memory alignments (the base's weights are read from safetensors): see OTHER_MEMORY
    torch.testing.assert_close(latents_of(fresh), expected, **OTHER_MEMORY)


def test_loading_checks_base_and_adapter(pipe, tmp_path):
    adapted(pipe)
    folder = save_pipeline_adapters(pipe, tmp_path / "run")
    with pytest.raises(ModelError, match="not a diffusers pipeline folder.*model_index.json"):
        load_pipeline_adapters(folder, base=tmp_path)
    other = tiny_sd_pipeline(unet_widths=(64, 64))  # same module names, other widths
    unet_before = unet_out(other.unet, unet_inputs())
    with pytest.raises(AdapterLoadError, match="shape"):
        load_pipeline_adapters(folder, base=other)
    assert not pipeline_adapters(other) and not any(isinstance(m, AdapterLayer) for m in other.unet.modules())
    torch.testing.assert_close(unet_out(other.unet, unet_inputs()), unet_before, rtol=0, atol=0)
    with pytest.raises(AdapterLoadError, match="no pipeline.json"):
        load_pipeline_adapters(tmp_path)
    info = json.loads((folder / "pipeline.json").read_text())
    for crafted, message in (({"components": ["../unet"]}, "a list of component folder names"),
                             ({"control": "../elsewhere"}, "\"control\" must be 'controlnet'")):
        (folder / "pipeline.json").write_text(json.dumps({**info, **crafted}))
        with pytest.raises(AdapterLoadError, match=message):
            load_pipeline_adapters(folder, base=other)


@pytest.mark.parametrize("config_cls", [HRAConfig, LoraConfig], ids=["hra", "lora"])
def test_peft_export_loads_in_peft(pipe, loaded, base_dir, tmp_path, config_cls):
    peft = pytest.importorskip("peft")
    models = add_pipeline_adapters(pipe, {"unet": config_cls(r=2), "text_encoder": config_cls(r=2)})
    for seed, model in enumerate(models.values()):
        perturb(model, seed)
    inputs, ids = unet_inputs(), pipe.tokenizer([PROMPT], return_tensors="pt").input_ids
    expected_unet, expected_text = unet_out(pipe.unet, inputs), text_out(pipe.text_encoder, ids)
    save_pipeline_adapters(pipe, tmp_path / "run")
    assert main(["export", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "peft")]) == 0
    fresh = copy.deepcopy(loaded)
    unet = peft.PeftModel.from_pretrained(fresh.unet, tmp_path / "peft" / "unet")
    text = peft.PeftModel.from_pretrained(fresh.text_encoder, tmp_path / "peft" / "text_encoder")
    assert (unet_out(fresh.unet, inputs) - unet_out(loaded.unet, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(unet_out(unet.base_model.model, inputs), expected_unet, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_out(text.base_model.model, ids), expected_text, rtol=1e-4, atol=1e-5)
    # the exported folder loads back in peftlab too (PEFT format per component)
    back = load_pipeline_adapters(tmp_path / "peft", base=copy.deepcopy(loaded))
    torch.testing.assert_close(unet_out(back.unet, inputs), expected_unet, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def run_dir(loaded, tmp_path_factory):
    """A saved pipeline adapter folder (HRA on the UNet, LoRA on the text encoder)."""
    return save_pipeline_adapters(adapted(copy.deepcopy(loaded)), tmp_path_factory.mktemp("runs") / "run")


def generate_args(run, out, *extra: str) -> list[str]:
    return ["generate", "--adapter", str(run), "--prompt", PROMPT, "--num-images", "3", "--steps", "2", "--seed", "0",
            "--guidance-scale", "2", "--out", str(out), *extra]


def test_generate_writes_images_and_grid(run_dir, tmp_path, capsys):
    from PIL import Image

    run = run_dir
    assert main(generate_args(run, tmp_path / "a" / "grid.png", "--scheduler", "EulerDiscreteScheduler")) == 0
    assert "grid.png" in capsys.readouterr().out
    images = [Image.open(tmp_path / "a" / f"grid-{i}.png") for i in range(3)]
    assert [im.size for im in images] == [(32, 32)] * 3 and Image.open(tmp_path / "a" / "grid.png").size == (96, 32)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["grid-0.png", "grid-1.png", "grid-2.png", "grid.png"]
    assert main(generate_args(run, tmp_path / "b" / "grid.png", "--scheduler", "EulerDiscreteScheduler")) == 0
    same_seed = [Image.open(tmp_path / "b" / f"grid-{i}.png") for i in range(3)]
    assert all(list(a.getdata()) == list(b.getdata()) for a, b in zip(images, same_seed, strict=True))  # same seed
    assert list(images[0].getdata()) != list(images[1].getdata())  # different noise per image


@pytest.mark.parametrize("extra, message", [
    (["--scheduler", "NoSuchScheduler"], "unknown scheduler 'NoSuchScheduler'; use a diffusers scheduler class such "
                                         "as DDIMScheduler"),
    (["--prompt", "dog " * 80], "--prompt is 82 tokens long .* at most 77"),
    (["--control", "edges.png"], "this run has no control encoder"),
    (["--control-type", "canny"], "--control-type computes the control map of an image: pass it with --control IMG"),
    (["--control", "x.png", "--control-type", "sobel"], "unknown --control-type 'sobel'; choose one of: canny, "),
    (["--height", "36"], "--height 36 is not a multiple of 8"),
])
def test_generate_bad_input_is_one_line(run_dir, tmp_path, capsys, extra, message):
    import re

    assert main(generate_args(run_dir, tmp_path / "grid.png", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not list(tmp_path.glob("*.png"))


def test_generate_on_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", "--model", str(tmp_path), "--prompt", PROMPT, "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a diffusers pipeline folder: it has no model_index.json" in err


def test_generate_with_a_control_encoder(pipe, loaded, tmp_path):
    from diffusers import ControlNetModel
    from PIL import Image

    controlnet = ControlNetModel.from_unet(loaded.unet, conditioning_embedding_out_channels=(16, 32))
    control_pipe = with_control_encoder(adapted(pipe), controlnet)
    run = save_pipeline_adapters(control_pipe, tmp_path / "run")
    assert json.loads((run / "pipeline.json").read_text())["control"] == "controlnet"
    Image.new("RGB", (32, 32), "white").save(tmp_path / "edges.png")
    args = generate_args(run, tmp_path / "c.png", "--num-images", "1")
    assert main(args) == 2  # a run with a control encoder needs --control
    assert main([*args, "--control", str(tmp_path / "edges.png")]) == 0
    assert Image.open(tmp_path / "c-0.png").size == (32, 32)


def test_embedded_name_without_the_embedded_module(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peftlab.diffusion.embedded" else real(name, *a))
    with pytest.raises(ModelError, match="embedded model 'tiny-digits' is not installed"):
        load_pipeline("tiny-digits")


def test_inspect_a_pipeline_folder(run_dir, capsys):
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "components ['text_encoder', 'unet']" in out and "[unet]" in out and "[text_encoder]" in out
    assert "down_blocks.0.attentions.0.proj_in" in out and "hra_u [32, 2]" in out and "lora_A [2, 32]" in out
